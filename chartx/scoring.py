"""Scoring a text with a model, by the two evaluation protocols (the families' protocol objects,
chartx.families.base, run them; chartx.evaluate's module docstring describes both):

sliding windows (evaluate_bits): every window of seq_len inputs scores its last `stride` targets;
recurrent streams (evaluate_recurrent): the text cut into batch_size contiguous streams, each read
in segments with the memory of the ones before.

The model enters only through its module's "logits" method (with a memory, for the recurrent
protocol); each function is compiled once under the mesh (jit_score_fn, jit_segment_score_fn).
"""

import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from chartx import progress as progress_lib
from chartx import sharding

# (params, windows_BxS, first_B) -> (nats, count): summed nll of the scored targets, in float32.
ScoreFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# (params, memory, inputs_BxT, targets_BxT, mask_BxT) -> (nats, count, memory): one segment of
# every stream, its masked targets' summed nll in float32, and the memory after it.
SegmentScoreFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, Any]]


def window_starts(num_chars: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts_W, first_W): window input starts, and each window's first scored target offset."""
  num_targets = num_chars - 1
  if num_targets <= seq_len:
    return np.zeros(1, np.int64), np.zeros(1, np.int64)
  starts = list(range(0, num_targets - seq_len, stride)) + [num_targets - seq_len]
  starts_W = np.unique(np.asarray(starts, np.int64))
  # Targets of window w cover [s_w + 1, s_w + seq_len]; it scores those past window w-1's last.
  first_W = np.concatenate([[0], seq_len - np.diff(starts_W)])
  return starts_W, first_W


def model_score_fn(model: Any) -> ScoreFn:
  """The ScoreFn of a model: its last layer's next-character prediction, without dropout.

  Window row b scores its targets at offsets >= first_B[b]; a padding row has first = T.
  """
  net = model.clone(deterministic=True, all_layers=False)

  def score(params, windows_BxS, first_B):
    inputs_BxT, targets_BxT = windows_BxS[:, :-1], windows_BxS[:, 1:]
    logits_BxTxV = net.apply({"params": params}, inputs_BxT, method="logits")
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    mask_BxT = jnp.arange(inputs_BxT.shape[1])[None, :] >= first_B[:, None]
    return jnp.where(mask_BxT, nll_BxT, 0.0).sum(), mask_BxT.sum()
  return score


def jit_score_fn(score: ScoreFn, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> ScoreFn:
  """score compiled under the mesh and rules, the batch split over the data axes, the sums replicated."""
  batch = sharding.batch_sharding(mesh)
  return sharding.MeshJit(score, mesh, rules, in_shardings=(None, batch, batch),
                          out_shardings=sharding.replicated(mesh))


def evaluate_bits(score: ScoreFn, params: Any, ids_M: np.ndarray, *, seq_len: int, stride: int,
                  batch_size: int, mesh: jax.sharding.Mesh, progress: bool = False,
                  desc: str = "eval") -> tuple[float, int]:
  """(total bits, characters scored) over the stream ids_M; score comes from jit_score_fn.

  Every process passes the whole stream and the same arguments; each feeds its own rows of each
  global batch. The last batch is padded with unscored rows, so score compiles once.
  """
  ids_M = np.asarray(ids_M, np.int32)
  seq_len = min(seq_len, len(ids_M) - 1)
  starts_W, first_W = window_starts(len(ids_M), seq_len, stride)
  num_batches = -(-len(starts_W) // batch_size)
  pad = num_batches * batch_size - len(starts_W)
  starts_W = np.concatenate([starts_W, np.zeros(pad, np.int64)])
  first_W = np.concatenate([first_W, np.full(pad, seq_len, np.int64)])
  index, count = sharding.process_slice(mesh, batch_size)
  rows = batch_size // count
  mine = slice(index * rows, (index + 1) * rows)  # This process's rows of each batch.
  offsets_S = np.arange(seq_len + 1)

  def outputs():
    for lo in range(0, len(starts_W), batch_size):
      starts_B, first_B = starts_W[lo:lo + batch_size][mine], first_W[lo:lo + batch_size][mine]
      windows_BxS = ids_M[starts_B[:, None] + offsets_S]
      yield score(params, jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), windows_BxS),
                  jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                                         first_B.astype(np.int32)))

  return _total_bits(outputs(), len(ids_M) - 1, desc=desc, progress=progress)


def _total_bits(outputs: Iterator[tuple[jax.Array, jax.Array]], num_chars: int, *, desc: str,
                progress: bool) -> tuple[float, int]:
  """(total bits, characters) of a stream of score outputs (nats, characters), with a progress
  bar of num_chars. Each output is read only once the next one is queued: the device never idles."""
  totals = [0.0, 0]
  with progress_lib.Progress(num_chars, desc, unit="char",
                             enabled=progress and jax.process_index() == 0) as bar:

    def read(out: tuple[jax.Array, jax.Array]) -> None:
      totals[0] += float(out[0])
      totals[1] += int(out[1])
      bar.update(int(out[1]), bpc=f"{totals[0] / math.log(2) / max(totals[1], 1):.4f}")

    pending = None
    for out in outputs:
      if pending is not None:
        read(pending)
      pending = out
    read(pending)
  return totals[0] / math.log(2), totals[1]



def stream_len(num_chars: int, batch_size: int) -> int:
  """Targets per stream when the num_chars - 1 targets of a text are cut into batch_size streams."""
  return -(-(num_chars - 1) // batch_size)


def model_segment_score_fn(model: Any) -> SegmentScoreFn:
  """The SegmentScoreFn of a Transformer-XL: its last layer's next-character prediction with the
  memory, without dropout. Masked-out targets (past a stream's end) count nothing."""
  net = model.clone(deterministic=True, all_layers=False)

  def score(params, memory, inputs_BxT, targets_BxT, mask_BxT):
    logits_BxTxV, memory = net.apply({"params": params}, inputs_BxT, memory, method="logits")
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.where(mask_BxT, nll_BxT, 0.0).sum(), mask_BxT.sum(), memory
  return score


def jit_segment_score_fn(score: SegmentScoreFn, memory_shardings: Any, mesh: jax.sharding.Mesh,
                         rules: sharding.Rules) -> SegmentScoreFn:
  """score compiled under the mesh and rules: the streams and their memory split over the data
  axes (the memory's buffers donated: each segment replaces it), the sums replicated."""
  batch = sharding.batch_sharding(mesh)
  return sharding.MeshJit(score, mesh, rules, in_shardings=(None, memory_shardings, batch, batch, batch),
                          out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                         memory_shardings), donate_argnums=1)


def stream_segments(ids_M: np.ndarray, *, seq_len: int,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs_BxP, targets_BxP, mask_BxP): the recurrent protocol's streams, P a multiple of
  seq_len. The N - 1 targets of ids_M are cut into batch_size contiguous streams of
  ceil((N - 1) / batch_size) (the last ones shorter, or empty); mask_BxP is False on the padding
  after a stream's end, so every target is scored exactly once."""
  per_stream = stream_len(len(ids_M), batch_size)
  padded = -(-per_stream // seq_len) * seq_len
  index_BxP = np.arange(batch_size)[:, None] * per_stream + np.arange(padded)[None, :]
  mask_BxP = (np.arange(padded)[None, :] < per_stream) & (index_BxP < len(ids_M) - 1)
  index_BxP = np.where(mask_BxP, index_BxP, 0)
  return ids_M[index_BxP], ids_M[index_BxP + 1], mask_BxP


def evaluate_recurrent(score: SegmentScoreFn, params: Any, memory: Any, ids_M: np.ndarray, *,
                       seq_len: int, batch_size: int, mesh: jax.sharding.Mesh,
                       progress: bool = False, desc: str = "eval") -> tuple[float, int]:
  """(total bits, characters scored) over the stream ids_M by the recurrent protocol; score comes
  from jit_segment_score_fn, memory is an empty memory of batch_size rows on its shardings (it
  is donated). Every process passes the whole stream; each feeds its own rows (streams)."""
  ids_M = np.asarray(ids_M, np.int32)
  inputs_BxP, targets_BxP, mask_BxP = stream_segments(ids_M, seq_len=seq_len, batch_size=batch_size)
  index, count = sharding.process_slice(mesh, batch_size)
  rows = batch_size // count
  mine = slice(index * rows, (index + 1) * rows)  # This process's streams.
  local = lambda x_BxT: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x_BxT[mine])

  def outputs():
    nonlocal memory
    for lo in range(0, inputs_BxP.shape[1], seq_len):
      segment = slice(lo, lo + seq_len)
      nats, chars, memory = score(params, memory, local(inputs_BxP[:, segment]),
                                  local(targets_BxP[:, segment]), local(mask_BxP[:, segment]))
      yield nats, chars

  return _total_bits(outputs(), len(ids_M) - 1, desc=desc, progress=progress)
