"""The text_files dataset: a user's own corpus (a file, a directory or a glob), as bytes.

The files are already local and usually small, so they are read straight into memory on
every run rather than prepared into a TFDS dataset (which would need a cache to invalidate
whenever a file changes).
"""

import glob
import os

import numpy as np

from chartx.errors import UserError


def list_files(path: str, *, key: str) -> list[str]:
  """The files `path` names, sorted: itself, all files under it (recursively) or its glob matches.

  Directories skip hidden entries and __pycache__ (compiled bytecode is not text).
  """
  if not path:
    raise UserError(f"{key} is empty: give a text file, a directory or a glob for data.name=text_files")
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    files = []
    for root, dirs, names in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
      files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    if not files:
      raise UserError(f"{key}={path!r} is a directory with no files in it")
    return sorted(files)
  if glob.has_magic(path):
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
      raise UserError(f"{key}={path!r}: the glob matches no files")
    return files
  raise UserError(f"{key}={path!r}: no such file or directory")


def read_bytes(path: str, *, key: str) -> np.ndarray:
  """The concatenated bytes of the files `path` names, as uint8; UserError naming `key` and `path`."""
  files = list_files(path, key=key)
  culprit = f"{key}={path!r}"
  chunks = []
  for name in files:
    try:
      with open(name, "rb") as f:
        chunks.append(f.read())
    except OSError as e:
      raise UserError(f"{culprit}: cannot read {name!r}: {e.strerror}") from None
  bytes_M = np.frombuffer(b"".join(chunks), dtype=np.uint8)
  if bytes_M.size == 0:
    raise UserError(f"{culprit} is empty" if len(files) == 1 else
                    f"{culprit}: all {len(files)} files are empty")
  return bytes_M


def load_splits(path: str, valid_path: str = "", test_path: str = ""
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, validation, test) uint8 byte streams.

  With no valid_path/test_path the concatenation of the files is split 90/5/5 in order;
  otherwise `path` is all training text and each split file stands in for its split (a
  missing one is still cut from the end of the training text, 5%).
  """
  bytes_M = read_bytes(path, key="data.path")
  valid = read_bytes(valid_path, key="data.valid_path") if valid_path else None
  test = read_bytes(test_path, key="data.test_path") if test_path else None
  num = len(bytes_M)
  cut = num // 20  # 5%
  end = num
  if test is None:
    test, end = bytes_M[end - cut:end], end - cut
  if valid is None:
    valid, end = bytes_M[end - cut:end], end - cut
  train = bytes_M[:end]
  for name, split in (("train", train), ("validation", valid), ("test", test)):
    if split.size == 0:
      raise UserError(f"data.path={path!r}: {num} bytes are too few for a non-empty {name} split "
                      "(a 90/5/5 split needs at least 20)")
  return train, valid, test
