"""Times preparing and loading an enwik8-sized dataset: a 100 MB member in the official zip format.

    python -m chartx.data.bench [--size=100000000] [--data_dir=DIR]

Writes DIR/downloads/manual/enwik8.zip (pseudo-random printable text; DIR defaults to a fresh
temporary directory, deleted afterwards), points the enwik8 builder's expected size and
checksum at it, then times: verifying the zip and building the TFDS dataset; loading the
prepared train split alone into memory; loading the whole corpus as training does.
"""

import dataclasses
import hashlib
import os
import tempfile
import time
import zipfile

from absl import app
from absl import flags
import ml_collections
import numpy as np

from chartx import errors
from chartx.data import builders
from chartx.data.corpus import load_corpus

_SIZE = flags.DEFINE_integer("size", 100_000_000, "Bytes of the enwik8 member to write.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir to use; empty: a temporary one.")


def _write_zip(path: str, size: int) -> None:
  rng = np.random.default_rng(0)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
    with archive.open("enwik8", "w", force_zip64=True) as member:
      for start in range(0, size, 1 << 24):
        member.write(rng.integers(32, 127, min(1 << 24, size - start), dtype=np.uint8).tobytes())


def run(data_dir: str, size: int) -> dict[str, float]:
  """Seconds per phase and the train split's size. Repoints builders.ZIPS["enwik8"] at the file it writes."""
  manual = os.path.join(data_dir, "downloads", "manual")
  os.makedirs(manual, exist_ok=True)
  zip_path = os.path.join(manual, "enwik8.zip")
  start = time.perf_counter()
  _write_zip(zip_path, size)
  write_s = time.perf_counter() - start
  with open(zip_path, "rb") as f:
    sha256 = hashlib.file_digest(f, "sha256").hexdigest()
  builders.ZIPS["enwik8"] = dataclasses.replace(
      builders.ZIPS["enwik8"], url="", zip_size=os.path.getsize(zip_path), zip_sha256=sha256,
      member_size=size)
  config = ml_collections.ConfigDict(dict(name="enwik8", data_dir=data_dir, path=""))

  start = time.perf_counter()
  load_corpus(config)
  prepare_s = time.perf_counter() - start

  start = time.perf_counter()
  (train,) = builders.load_splits("enwik8", data_dir=data_dir, splits=("train",))
  train_s = time.perf_counter() - start

  start = time.perf_counter()
  corpus = load_corpus(config)
  corpus_s = time.perf_counter() - start
  assert np.array_equal(corpus.train, train)
  return dict(write_zip_s=write_s, verify_and_build_s=prepare_s, load_train_s=train_s,
              load_corpus_s=corpus_s, train_chars=len(train))


def main(argv: list[str]) -> None:
  del argv
  with errors.one_line_errors(), tempfile.TemporaryDirectory() as tmp:
    results = run(_DATA_DIR.value or tmp, _SIZE.value)
  print(f"enwik8 format, {_SIZE.value:,} bytes: " + ", ".join(
      f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v:,}" for k, v in results.items()))


if __name__ == "__main__":
  app.run(main)
