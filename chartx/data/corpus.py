"""Corpus: the three splits of a dataset as in-order id streams, and load_corpus(config.data)."""

import dataclasses

import ml_collections
import numpy as np

from chartx.data import text_files
from chartx.data.vocab import BYTES, TEXT8, Vocab
from chartx.errors import UserError


@dataclasses.dataclass(frozen=True)
class Corpus:
  """1-D uint8 id streams, in order. Evaluation reads validation/test front to back."""

  train: np.ndarray
  validation: np.ndarray
  test: np.ndarray
  vocab: Vocab


def eval_stream(corpus: Corpus, split: str) -> np.ndarray:
  """The in-order ids of `split` ("validation" | "test"; eval.split, checked by chartx.evaluate)."""
  return {"validation": corpus.validation, "test": corpus.test}[split]


def vocab_for(data_config: ml_collections.ConfigDict) -> Vocab:
  """The vocabulary of data_config.name, without loading anything."""
  if data_config.name == "text8":
    return TEXT8
  if data_config.name in ("enwik8", "text_files"):
    return BYTES
  raise UserError(f"data.name={data_config.name!r}: expected 'enwik8', 'text8' or 'text_files'")


def check_config(config: ml_collections.ConfigDict) -> Vocab:
  """The data section's owner: the keys that need no file (the paths: load_corpus); the vocabulary."""
  # Its upper bound, if any, is the model family's (the fixed family's positional tables).
  if config.data.seq_len < 1:
    raise UserError(f"config.data.seq_len must be >= 1, got {config.data.seq_len}")
  return vocab_for(config.data)


def load_corpus(data_config: ml_collections.ConfigDict) -> Corpus:
  """Loads data_config.name ("enwik8" | "text8" | "text_files") into memory."""
  vocab = vocab_for(data_config)
  if data_config.name == "text_files":
    train, validation, test = text_files.load_splits(
        data_config.path, data_config.get("valid_path", ""), data_config.get("test_path", ""))
  else:
    # Imported here, not at the top: TFDS is needed only for enwik8/text8, and machines without
    # it (the GPU check's) run everything else.
    from chartx.data import builders  # pylint: disable=import-outside-toplevel
    train, validation, test = builders.load_splits(
        data_config.name, data_dir=data_config.get("data_dir", ""), zip_path=data_config.get("path", ""))
  return Corpus(train=train, validation=validation, test=test, vocab=vocab)
