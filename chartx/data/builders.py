"""TFDS builders for enwik8 and text8 (Mahoney's 100 MB Wikipedia files), stored as array_record.

Each split is a sequence of examples {"index": i, "ids": 1 MiB of uint8 ids}, written in order
(shuffling disabled) and read back with builder.as_data_source(), which needs no TensorFlow.
The zip is taken, in this order, from data.path, from TFDS's manual_dir
(<data_dir>/downloads/manual/<name>.zip), from an earlier download in <data_dir>/downloads, or
downloaded from the official URL; it is verified (size and SHA-256, then the one member's name
and size) before anything is written. TFDS writes into a temporary directory and renames it
only when every split is written, so a failed build leaves nothing that looks prepared.
"""

import abc
import dataclasses
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from chartx.data.vocab import text8_ids_from_bytes
from chartx.errors import UserError


@dataclasses.dataclass(frozen=True)
class ZipSpec:
  """What the official zip must be: the single member's name and size pin the split sizes."""

  url: str  # "" never downloads (tests).
  zip_size: int
  zip_sha256: str
  member: str
  member_size: int


# Sizes and SHA-256 of the official files as several independent public sources record them
# (zips: 36,445,475 and 31,344,016 bytes; each holds one file of exactly 100,000,000 bytes).
# Tests replace entries to build from small zips in the same format.
ZIPS: dict[str, ZipSpec] = {
    "enwik8": ZipSpec(
        url="http://mattmahoney.net/dc/enwik8.zip",
        zip_size=36_445_475,
        zip_sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        member="enwik8",
        member_size=100_000_000),
    "text8": ZipSpec(
        url="http://mattmahoney.net/dc/text8.zip",
        zip_size=31_344_016,
        zip_sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
        member="text8",
        member_size=100_000_000),
}

SPLITS = ("train", "validation", "test")
CHUNK_CHARS = 1 << 20  # Ids per stored example: few records to read, little memory per record.
DOWNLOAD_TIMEOUT_S = 10.0  # Per socket operation; a machine without network fails at once.


def split_sizes(member_size: int) -> dict[str, int]:
  """The standard split: first 90% train, next 5% validation, last 5% test (90M/5M/5M of 100M)."""
  train = member_size * 90 // 100
  validation = member_size * 5 // 100
  return {"train": train, "validation": validation, "test": member_size - train - validation}


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while block := f.read(1 << 24):
      digest.update(block)
  return digest.hexdigest()


def verify_zip(path: epath.Path, spec: ZipSpec) -> None:
  """UserError naming `path` unless it is the official zip (size and SHA-256)."""
  size = path.stat().length
  if size != spec.zip_size:
    raise UserError(f"{path} is {size} bytes, but the official {spec.member}.zip is {spec.zip_size} "
                    f"bytes: replace it with {spec.url or 'the official file'}")
  sha256 = _sha256(path)
  if sha256 != spec.zip_sha256:
    raise UserError(f"{path} has SHA-256 {sha256}, but the official {spec.member}.zip has "
                    f"{spec.zip_sha256}: the file is corrupt or not the official one; replace it "
                    f"with {spec.url or 'the official file'}")


def read_member(path: epath.Path, spec: ZipSpec) -> np.ndarray:
  """The bytes of the zip's single member, checked by name, size and the zip's own CRC."""
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if names != [spec.member]:
        raise UserError(f"{path} holds {names}, not the single file {spec.member!r} of the official zip")
      data = archive.read(spec.member)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as e:
    raise UserError(f"{path} is not a readable zip ({e}): replace it with "
                    f"{spec.url or 'the official file'}") from None
  if len(data) != spec.member_size:
    raise UserError(f"{path}: {spec.member} is {len(data)} bytes, expected {spec.member_size}")
  return np.frombuffer(data, dtype=np.uint8)


def _download(spec: ZipSpec, dest: epath.Path) -> str:
  """Downloads and verifies spec.url as dest (via a .part file); returns "" or why it failed."""
  part = dest.with_name(dest.name + ".part")
  try:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # urllib rather than TFDS's downloader: that one has no timeout, and a firewalled machine
    # would hang instead of falling back to the manual_dir instructions.
    with urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as response, part.open("wb") as f:
      while block := response.read(1 << 20):
        f.write(block)
    verify_zip(part, spec)  # A bad download is never kept where the next run would find it.
  except (urllib.error.URLError, OSError, UserError) as e:
    part.unlink(missing_ok=True)
    return str(getattr(e, "reason", e))
  part.rename(dest)
  return ""


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path:
  try:
    return dl_manager.manual_dir
  except AssertionError:  # TFDS raises when it is missing or empty; the conventional path then.
    return dl_manager.download_dir / "manual"


class _MahoneyZipBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A 100 MB file from one official zip, split 90/5/5 in order, stored as chunks of ids."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Ordered 1 MiB chunks of uint8 ids; 90/5/5 split."}
  # Where TFDS would look for a checksums.tsv beside this file; the zip is verified by ZIPS
  # instead. Left to TFDS 4.9.10, finding it imports importlib_resources, absent on Python >= 3.9.
  code_path = None

  def __init__(self, *, zip_path: str = "", **kwargs):
    self._zip_path = zip_path  # data.path: the zip, when it is not in manual_dir.
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "index": np.int64,
            "ids": tfds.features.Tensor(shape=(None,), dtype=np.uint8,
                                        encoding=tfds.features.Encoding.BYTES),
        }),
        homepage="http://mattmahoney.net/dc/textdata.html",
        disable_shuffling=True,
    )

  def _find_zip(self, dl_manager: tfds.download.DownloadManager) -> epath.Path:
    spec = ZIPS[self.name]
    if self._zip_path:
      path = epath.Path(self._zip_path)
      if not path.is_file():
        raise UserError(f"data.path={self._zip_path!r}: no such file (expected {self.name}.zip)")
      return path
    manual = _manual_dir(dl_manager) / f"{self.name}.zip"
    downloaded = dl_manager.download_dir / f"{self.name}.zip"
    for path in (manual, downloaded):
      if path.is_file():
        return path
    why = _download(spec, downloaded) if spec.url else "downloading is off"
    if not why:
      return downloaded
    raise UserError(
        f"{self.name}: {manual} does not exist and downloading {spec.url or 'it'} failed ({why}); "
        f"get {spec.url or f'{self.name}.zip'} ({spec.zip_size} bytes) on a machine with network "
        f"and put it at {manual}, or set data.path to the zip")

  @abc.abstractmethod
  def _ids(self, bytes_M: np.ndarray, source: str) -> np.ndarray:
    """The member's bytes as ids of this dataset's vocabulary."""

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # Every check runs here, before TFDS writes a single record.
    spec = ZIPS[self.name]
    path = self._find_zip(dl_manager)
    verify_zip(path, spec)
    ids_M = self._ids(read_member(path, spec), source=f"{path}:{spec.member}")
    generators = {}
    start = 0
    for split, size in split_sizes(len(ids_M)).items():
      generators[split] = self._generate_examples(ids_M[start:start + size])
      start += size
    return generators

  def _generate_examples(self, ids_M: np.ndarray):
    for index, start in enumerate(range(0, len(ids_M), CHUNK_CHARS)):
      yield index, {"index": index, "ids": ids_M[start:start + CHUNK_CHARS]}


class Enwik8(_MahoneyZipBuilder):
  """enwik8: the first 100,000,000 bytes of the English Wikipedia dump of 2006-03-03; byte ids."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {ZIPS['enwik8'].url} and put it in manual_dir as enwik8.zip."

  def _ids(self, bytes_M: np.ndarray, source: str) -> np.ndarray:
    return bytes_M


class Text8(_MahoneyZipBuilder):
  """text8: enwik8's source cleaned to a-z and space; ids 0..25 are a-z, 26 is space."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {ZIPS['text8'].url} and put it in manual_dir as text8.zip."

  def _ids(self, bytes_M: np.ndarray, source: str) -> np.ndarray:
    return text8_ids_from_bytes(bytes_M, source=source)


BUILDERS = {"enwik8": Enwik8, "text8": Text8}


def _read_split(source, *, split: str, expected_chars: int, where: str) -> np.ndarray:
  records = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["index"]))
  if [int(r["index"]) for r in records] != list(range(len(records))):
    raise UserError(f"{where}: the {split} split's chunks are not 0..{len(records) - 1}; "
                    f"delete {where} to rebuild it")
  ids_M = np.concatenate([r["ids"] for r in records]) if records else np.zeros(0, np.uint8)
  if len(ids_M) != expected_chars:
    raise UserError(f"{where}: the {split} split has {len(ids_M)} characters, expected "
                    f"{expected_chars}; delete {where} to rebuild it")
  return ids_M


def load_splits(name: str, *, data_dir: str = "", zip_path: str = "",
                splits: tuple[str, ...] = SPLITS) -> tuple[np.ndarray, ...]:
  """uint8 id streams of enwik8 or text8 (train, validation, test), preparing them on first use."""
  # TFDS makes an empty /tmp/tmp*tfds directory (tempfile.mkdtemp, for metadata it would fetch
  # from GCS) each time a builder whose data is not prepared yet is constructed, and never removes
  # it: constructed with tempfile's default directory pointing into one of ours, removed after.
  with tempfile.TemporaryDirectory(prefix="chartx_tfds_") as scratch:
    default, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      builder = BUILDERS[name](data_dir=data_dir or None, zip_path=zip_path, file_format="array_record")
    finally:
      tempfile.tempdir = default
  # try_download_gcs=False: TFDS would otherwise ask GCS for a prebuilt copy, over the network.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  sources = builder.as_data_source()
  expected = split_sizes(ZIPS[name].member_size)
  where = os.fspath(builder.data_dir)
  return tuple(_read_split(sources[s], split=s, expected_chars=expected[s], where=where) for s in splits)
