"""Bits per character on a split: the paper's sliding-window protocol (stride 1) or strided.

A window holds seq_len = T characters of input and scores the last `stride` of its T targets,
then slides by the stride, so every scored character has at least T - stride + 1 characters of
context (T - (stride - 1) / 2 on average). Stride 1 is the paper's protocol: each character is
predicted from the full T before it, at the cost of one forward pass of T positions per
character. A stride costs 1/stride of that, and the bpc it reports is higher (less context), the
more so the larger the stride; stride T gives contexts of 1 to T. The first window scores all
of its targets with the context they have, and the last window is moved back to end at the
split's end; so every character but the first (nothing predicts it: there is no start symbol) is
scored exactly once. eval_<split>.json reports "context" (T) and "min_context" (T - stride + 1).

Speed: README.md's performance table (benchmarks/eval_sample.py); a larger eval.batch_size helps
stride 1 most.

    python -m chartx.main --config=configs/tiny.py --workdir=DIR --mode=eval \
        --config.eval.stride=1 --config.eval.split=test
"""

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chartx import data, files, inference, metrics, sharding
from chartx import progress as progress_lib
from chartx import model as model_lib
from chartx.errors import UserError

# (params, windows_BxS, first_B) -> (nats, count): summed nll of the scored targets, in float32.
ScoreFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


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


def model_score_fn(model: model_lib.Transformer) -> ScoreFn:
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
  totals = [0.0, 0]  # Nats and characters of the batches read so far.
  with progress_lib.Progress(len(ids_M) - 1, desc, unit="char",
                            enabled=progress and jax.process_index() == 0) as bar:

    def read(out: tuple[jax.Array, jax.Array]) -> None:
      totals[0] += float(out[0])
      totals[1] += int(out[1])
      bar.update(int(out[1]), bpc=f"{totals[0] / math.log(2) / max(totals[1], 1):.4f}")

    pending = None
    for lo in range(0, len(starts_W), batch_size):
      starts_B, first_B = starts_W[lo:lo + batch_size][mine], first_W[lo:lo + batch_size][mine]
      windows_BxS = ids_M[starts_B[:, None] + offsets_S]
      out = score(params, jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), windows_BxS),
                  jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                                         first_B.astype(np.int32)))
      if pending is not None:  # Read a batch only once the next is queued: the device never idles.
        read(pending)
      pending = out
    read(pending)
  return totals[0] / math.log(2), totals[1]


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """The eval section's owner: every eval.* key, UserError naming a bad one."""
  e = config.eval
  if e.split not in ("validation", "test"):
    raise UserError(f"config.eval.split must be validation or test, got {e.split!r}")
  if not 1 <= e.stride <= config.data.seq_len:
    raise UserError(f"config.eval.stride={e.stride} must be in [1, data.seq_len={config.data.seq_len}]")
  if e.max_chars < 0:
    raise UserError(f"config.eval.max_chars must be >= 0 (0: the whole split), got {e.max_chars}")
  if e.batch_size < 1:
    raise UserError(f"config.eval.batch_size must be >= 1, got {e.batch_size}")
  sharding.check_batch(e.batch_size, mesh, "config.eval.batch_size")
  inference.checkpoint_step(config)  # eval.step and eval.best.


def eval_ids(config: ml_collections.ConfigDict, corpus: data.Corpus) -> np.ndarray:
  """The prefix of config.eval.split that evaluation reads (eval.max_chars; 0 is all of it)."""
  ids_M = data.eval_stream(corpus, config.eval.split)
  ids_M = ids_M[:config.eval.max_chars or len(ids_M)]
  if len(ids_M) < 2:
    raise UserError(f"config.eval.split={config.eval.split!r} has {len(ids_M)} characters "
                    "(with eval.max_chars); evaluation needs at least 2")
  return ids_M


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: bpc of a checkpoint on eval.split; writes WORKDIR/eval_<split>.json and a
  metrics.jsonl record, and returns the result."""
  check_config(config, sharding.make_mesh(config))  # Before anything slow.
  corpus = data.load_corpus(config.data)
  ids_M = eval_ids(config, corpus)
  restored = inference.restore(config, workdir, corpus.vocab.size)
  split, seq_len, stride = config.eval.split, config.data.seq_len, config.eval.stride
  score = jit_score_fn(model_score_fn(restored.model), restored.mesh, restored.rules)
  start = time.time()
  bits, count = evaluate_bits(score, restored.params, ids_M, seq_len=seq_len, stride=stride,
                              batch_size=config.eval.batch_size, mesh=restored.mesh, progress=True,
                              desc=f"eval {split}")
  seconds = time.time() - start
  window = min(seq_len, len(ids_M) - 1)
  result = {"split": split, "step": restored.step, "bpc": bits / count, "num_chars": count,
            "stride": stride, "context": window, "min_context": window - min(stride, window) + 1,
            "bits": bits, "max_chars": config.eval.max_chars, "seconds": round(seconds, 3),
            "chars_per_sec": count / seconds}
  if jax.process_index() == 0:
    write_result(workdir, result)
  return result


def write_result(workdir: str, result: dict[str, Any]) -> None:
  """WORKDIR/eval_<split>.json and a metrics.jsonl record of an evaluation, and its line on stdout."""
  split, step, count, stride = result["split"], result["step"], result["num_chars"], result["stride"]
  files.write_text(os.path.join(workdir, f"eval_{split}.json"), json.dumps(result, indent=2) + "\n")
  writer = metrics.MetricWriter(workdir)
  writer.write(step, {f"eval_{split}_bpc": result["bpc"], f"eval_{split}_chars": count,
                      f"eval_{split}_stride": stride})
  writer.close()
  print(f"step {step}: {split} bpc {result['bpc']:.4f} over {count:,} characters "
        f"(stride {stride}, context {result['context']})", flush=True)
