"""Vocabularies: bytes (enwik8, text files) and text8's 27 symbols."""

import dataclasses

import numpy as np

from chartx.errors import UserError

TEXT8_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def _text8_byte_to_id() -> np.ndarray:
  table_256 = np.full(256, -1, dtype=np.int32)
  for i, char in enumerate(TEXT8_ALPHABET):
    table_256[ord(char)] = i
  return table_256


_TEXT8_BYTE_TO_ID_256 = _text8_byte_to_id()
_TEXT8_ID_TO_BYTE_27 = np.frombuffer(TEXT8_ALPHABET.encode("ascii"), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Maps text to int32 ids and back. name: "bytes" (256 ids) or "text8" (27 ids: a-z then space)."""

  name: str
  size: int

  def encode(self, text: str, source: str = "text") -> np.ndarray:
    """int32 ids; a character outside the vocabulary raises UserError naming `source`."""
    bytes_M = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if self.name == "bytes":
      return bytes_M.astype(np.int32)
    return text8_ids_from_bytes(bytes_M, source=source).astype(np.int32)

  def decode(self, ids) -> str:
    ids_M = np.asarray(ids).reshape(-1)
    if ids_M.size and (ids_M.min() < 0 or ids_M.max() >= self.size):
      raise UserError(f"cannot decode ids outside [0, {self.size}) with the {self.name} vocabulary")
    if self.name == "bytes":
      return ids_M.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    return _TEXT8_ID_TO_BYTE_27[ids_M].tobytes().decode("ascii")


BYTES = Vocab(name="bytes", size=256)
TEXT8 = Vocab(name="text8", size=len(TEXT8_ALPHABET))


def text8_ids_from_bytes(bytes_M: np.ndarray, *, source: str) -> np.ndarray:
  """uint8 text8 ids of raw bytes; UserError naming `source` and the first byte outside a-z and space."""
  ids_M = _TEXT8_BYTE_TO_ID_256[bytes_M]
  bad_M = ids_M < 0
  if bad_M.any():
    position = int(np.argmax(bad_M))
    byte = int(bytes_M[position])
    shown = repr(chr(byte)) if byte < 128 else f"byte 0x{byte:02x}"
    raise UserError(
        f"{source}: character {shown} at offset {position} is not in the text8 alphabet (a-z and space)")
  return ids_M.astype(np.uint8)

