"""Bits per character on a split: the paper's sliding-window protocol (stride 1) or strided.

Every character after the first is scored exactly once. A window holds seq_len characters of
input; it scores the last `stride` of its targets, so each has at least seq_len - stride
characters of context (the first window scores all of its targets, with the context they have).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def window_starts(num_chars: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts_W, first_scored_W): window input starts, and each window's first scored target offset."""
  num_targets = num_chars - 1
  if num_targets <= seq_len:
    return np.zeros(1, np.int64), np.zeros(1, np.int64)
  starts = list(range(0, num_targets - seq_len, stride)) + [num_targets - seq_len]
  starts_W = np.unique(np.asarray(starts, np.int64))
  # Targets of window w cover [s_w + 1, s_w + seq_len]; it scores those past window w-1's last.
  first_W = np.concatenate([[0], seq_len - np.diff(starts_W)])
  return starts_W, first_W


def nll_fn(logits_fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(inputs_BxT, targets_BxT) -> per-character nll_BxT in nats, from a tokens -> logits function."""
  def fn(inputs_BxT, targets_BxT):
    logits_BxTxV = logits_fn(inputs_BxT)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return fn


def evaluate_bits(nll: Callable[[jax.Array, jax.Array], jax.Array], ids_N: np.ndarray, *, seq_len: int,
                  stride: int, batch_size: int) -> tuple[float, int]:
  """Total bits and the number of characters scored over the stream ids_N."""
  ids_N = np.asarray(ids_N, np.int32)
  seq_len = min(seq_len, len(ids_N) - 1)
  starts_W, first_W = window_starts(len(ids_N), seq_len, stride)
  offsets_T = np.arange(seq_len)
  total_nats, count = 0.0, 0
  for lo in range(0, len(starts_W), batch_size):
    starts_B, first_B = starts_W[lo:lo + batch_size], first_W[lo:lo + batch_size]
    real = len(starts_B)
    # Pad the last batch to a full one so the function compiles once.
    starts_B = np.pad(starts_B, (0, batch_size - real), mode="edge")
    windows_BxS = ids_N[starts_B[:, None] + np.arange(seq_len + 1)]
    nll_BxT = np.asarray(nll(windows_BxS[:, :-1], windows_BxS[:, 1:]))[:real]
    mask_BxT = offsets_T[None, :] >= first_B[:, None]
    total_nats += float(nll_BxT[mask_BxT].sum(dtype=np.float64))
    count += int(mask_BxT.sum())
  return total_nats / math.log(2), count
