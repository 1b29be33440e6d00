"""The data layer: enwik8, text8 and local text files; vocabularies; training batches.

corpus.validation and corpus.test (or eval_stream(corpus, split)) are the in-order streams
that evaluation reads; train_batch samples training windows from corpus.train, and
stream_batch cuts it into contiguous streams (Transformer-XL).
"""

from chartx.data.corpus import Corpus, check_config, eval_stream, load_corpus, vocab_for
from chartx.data.sampling import segments_per_pass, stream_batch, train_batch
from chartx.data.vocab import BYTES, TEXT8, Vocab

__all__ = ["BYTES", "TEXT8", "Corpus", "Vocab", "check_config", "eval_stream", "load_corpus",
           "segments_per_pass", "stream_batch", "train_batch", "vocab_for"]
