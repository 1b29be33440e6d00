"""Files in a workdir, which may be a local path or an fsspec URL (gs:// with the `gcs` extra,
memory:// in tests): every file chartx and its tools write or read there other than checkpoints
and TensorBoard events (Orbax and tensorboardX open URLs themselves) goes through here.
"""

import os

from chartx import errors
from chartx.errors import UserError


def is_remote(path: str) -> bool:
  return "://" in path


def fsspec_module():
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("a gs:// (or other URL) workdir needs fsspec and gcsfs: "
                    "pip install 'chartx[gcs]'") from None
  return fsspec


def _fs(path: str):
  """(filesystem, path on it) for a URL."""
  return fsspec_module().core.url_to_fs(path)


def exists(path: str) -> bool:
  if is_remote(path):
    fs, fs_path = _fs(path)
    return fs.exists(fs_path)
  return os.path.exists(path)


def is_dir(path: str) -> bool:
  if is_remote(path):
    fs, fs_path = _fs(path)
    return fs.isdir(fs_path)
  return os.path.isdir(path)


def list_dir(path: str) -> list[str]:
  """The names in a directory (not their paths), sorted."""
  if is_remote(path):
    fs, fs_path = _fs(path)
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(fs_path, detail=False))
  return sorted(os.listdir(path))


def read_text(path: str) -> str | None:
  """The file's text, or None if there is no such file."""
  if is_remote(path):
    fs, fs_path = _fs(path)
    return fs.cat_file(fs_path).decode("utf-8") if fs.exists(fs_path) else None
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes the whole file, creating its directory; raises errors.WriteFailed if it cannot."""
  try:
    if is_remote(path):
      with fsspec_module().open(path, "wb") as f:
        f.write(data)
      return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  except OSError as e:
    raise errors.write_failed(path, e) from e


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))
