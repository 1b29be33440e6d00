"""The data layer: enwik8, text8 and local text files; vocabularies; training batches.

corpus.validation and corpus.test (or eval_stream(corpus, split)) are the in-order streams
that evaluation reads; train_batch samples training windows from corpus.train.
"""

from chartx.data.corpus import Corpus, check_config, eval_stream, load_corpus, vocab_for
from chartx.data.sampling import train_batch
from chartx.data.vocab import BYTES, TEXT8, Vocab

__all__ = ["BYTES", "TEXT8", "Corpus", "Vocab", "check_config", "eval_stream", "load_corpus",
           "train_batch", "vocab_for"]
