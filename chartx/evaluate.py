"""Bits per character on a split, by the protocol of the model's family (Protocol, Evaluator):

sliding_window (the fixed family). A window holds seq_len = T characters of input and scores the
last `stride` of its T targets, then slides by the stride, so every scored character has at least
T - stride + 1 characters of context (T - (stride - 1) / 2 on average). Stride 1 is the paper's
protocol: each character is predicted from the full T before it, at the cost of one forward pass
of T positions per character. A stride costs 1/stride of that, and the bpc it reports is higher
(less context), the more so the larger the stride; stride T (eval.stride=0) gives contexts of 1 to
T. The first window scores all of its targets with the context they have, and the last window is
moved back to end at the split's end.

recurrent (Transformer-XL). The split is cut into eval.batch_size contiguous streams, one per
batch row; each is read front to back in segments of eval.seq_len characters, every segment
scored whole with the memory of the eval.mem_len positions before it (per layer, as in
training), so a forward pass costs T positions per T characters whatever the memory. A stream's
first characters see only what comes before them in their stream.

Either way every character but the first (nothing predicts it: there is no start symbol) is
scored exactly once. eval_<split>.json reports the "protocol" and its "attention_length" (the most
characters any scored character could see: the window T; the memory plus the segment, M + T, or
with eval.same_length, where every character sees the same number, M + 1).

Speed: README.md's performance table (benchmarks/eval_sample.py, benchmarks/xl_eval.py); a larger
eval.batch_size helps stride 1 most.

    python -m chartx.main --config=configs/tiny.py --workdir=DIR --mode=eval \
        --config.eval.stride=1 --config.eval.split=test
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chartx import data, files, inference, metrics, sharding, train
from chartx import progress as progress_lib
from chartx.families import fixed, registry
from chartx.errors import UserError

# (params, windows_BxS, first_B) -> (nats, count): summed nll of the scored targets, in float32.
ScoreFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# (params, memory, inputs_BxT, targets_BxT, mask_BxT) -> (nats, count, memory): one segment of
# every stream, its masked targets' summed nll in float32, and the memory after it.
SegmentScoreFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, Any]]

SLIDING_WINDOW, RECURRENT = "sliding_window", "recurrent"
SAME_LENGTH = ("auto", "true", "false")  # eval.same_length; auto: model.same_length.


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a split is scored: the eval.* keys resolved for the model's family."""
  name: str  # SLIDING_WINDOW (fixed) | RECURRENT (xl)
  seq_len: int  # T: the window (sliding_window) or each segment (recurrent).
  stride: int  # Characters each forward pass scores: the stride, or T (a segment is scored whole).
  mem_len: int = 0  # recurrent: M, the positions of memory each segment sees.
  clamp_len: int = 0  # recurrent: relative distances above it share its encoding; 0: none.
  same_length: bool = False  # recurrent: every character sees M + 1 characters (else up to M + T).

  def attention_length(self, num_chars: int, batch_size: int) -> int:
    """The most characters any scored character of a text of num_chars could see (the input
    position before it included): the window T, or the memory plus the segment (with
    same_length, M + 1: its own position and the M before it), no more than a stream holds."""
    if self.name == SLIDING_WINDOW:
      return min(self.seq_len, num_chars - 1)
    length = self.mem_len + (1 if self.same_length else self.seq_len)
    return min(length, _stream_len(num_chars, batch_size))

  def describe(self, num_chars: int, batch_size: int) -> dict[str, Any]:
    """The protocol's fields in eval_<split>.json, for a text of num_chars in batches of batch_size."""
    fields = {"protocol": self.name, "attention_length": self.attention_length(num_chars, batch_size),
              "stride": self.stride}
    if self.name == RECURRENT:
      fields.update(seq_len=self.seq_len, mem_len=self.mem_len, clamp_len=self.clamp_len,
                    same_length=self.same_length, streams=batch_size)
    return fields


def protocol(config: ml_collections.ConfigDict) -> Protocol:
  """The protocol of config.model.family with the eval.* keys resolved (check_config checks them)."""
  e, m = config.eval, config.model
  if m.family != "xl":
    return Protocol(SLIDING_WINDOW, seq_len=config.data.seq_len, stride=e.stride or config.data.seq_len)
  seq_len = e.seq_len or config.data.seq_len
  same_length = m.same_length if e.same_length.lower() == "auto" else e.same_length.lower() == "true"
  return Protocol(RECURRENT, seq_len=seq_len, stride=seq_len,
                  mem_len=m.mem_len if e.mem_len == -1 else e.mem_len,
                  clamp_len=m.clamp_len if e.clamp_len == -1 else e.clamp_len,
                  same_length=same_length)


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


def model_score_fn(model: fixed.Transformer) -> ScoreFn:
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


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """The eval section's owner: every eval.* key, UserError naming a bad one."""
  e = config.eval
  if e.split not in ("validation", "test"):
    raise UserError(f"config.eval.split must be validation or test, got {e.split!r}")
  if e.same_length.lower() not in SAME_LENGTH:
    raise UserError(f"config.eval.same_length must be one of {', '.join(SAME_LENGTH)} (auto: as "
                    f"model.same_length), got {e.same_length!r}")
  recurrent = {"seq_len": (e.seq_len, 0), "mem_len": (e.mem_len, -1), "clamp_len": (e.clamp_len, -1),
               "same_length": (e.same_length.lower(), "auto")}
  if config.model.family == "xl":
    if e.stride:
      raise UserError(f"config.eval.stride={e.stride} is the fixed family's sliding window; "
                      "model.family=xl evaluates recurrently (eval.seq_len, eval.mem_len): leave "
                      "eval.stride at 0")
    for key, low in (("seq_len", 0), ("mem_len", -1), ("clamp_len", -1)):
      if e[key] < low:
        raise UserError(f"config.eval.{key} must be >= {low} ({low}: as in training), got {e[key]}")
    resolved = protocol(config)
    if resolved.same_length and resolved.mem_len < 1:
      raise UserError(f"config.eval.same_length={e.same_length} needs a memory (eval.mem_len >= 1; "
                      f"it is {resolved.mem_len}): with none, every character would see only itself")
  else:
    if not 0 <= e.stride <= config.data.seq_len:
      raise UserError(f"config.eval.stride={e.stride} must be in [0, data.seq_len={config.data.seq_len}] "
                      "(0: data.seq_len)")
    for key, (value, default) in recurrent.items():
      if value != default:
        raise UserError(f"config.eval.{key}={e[key]!r} is Transformer-XL's recurrent evaluation; "
                        f"model.family={config.model.family} evaluates with a sliding window "
                        "(eval.stride): leave it out")
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


def _stream_len(num_chars: int, batch_size: int) -> int:
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
  stream_len = _stream_len(len(ids_M), batch_size)
  padded = -(-stream_len // seq_len) * seq_len
  index_BxP = np.arange(batch_size)[:, None] * stream_len + np.arange(padded)[None, :]
  mask_BxP = (np.arange(padded)[None, :] < stream_len) & (index_BxP < len(ids_M) - 1)
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


def inference_model(model: Any, proto: Protocol) -> Any:
  """The model as evaluation and sampling run it, deterministic: a Transformer-XL with the memory
  of `proto` (eval.mem_len, eval.clamp_len, eval.same_length: the same parameters serve any), the
  fixed family as it is."""
  if proto.name == SLIDING_WINDOW:
    return model
  return registry.build(dataclasses.replace(model.cfg, mem_len=proto.mem_len, clamp_len=proto.clamp_len,
                                             same_length=proto.same_length))


class Evaluator:
  """evaluator(params, ids_M) -> (total bits, characters scored): a model's bits on a text by a
  Protocol, compiled once; training's validation, --mode=eval and chartx.load's score use it.

  model: the family's module (any clone of it: the evaluator runs it deterministic, last layer).
  batch_size: windows per batch (sliding_window) or streams (recurrent), a multiple of the
  data-parallel devices.
  """

  def __init__(self, model: Any, proto: Protocol, mesh: jax.sharding.Mesh, rules: sharding.Rules,
               batch_size: int):
    self.protocol, self.batch_size, self._mesh = proto, batch_size, mesh
    if proto.name == SLIDING_WINDOW:
      self._score = jit_score_fn(model_score_fn(model), mesh, rules)
      return
    model = inference_model(model, proto)
    _, memory_shardings, self._empty_memory = sharding.sharded_init(
        lambda _: train.boxed_memory(model.cfg, batch_size), mesh, rules)
    self._score = jit_segment_score_fn(model_segment_score_fn(model), memory_shardings, mesh, rules)

  def __call__(self, params: Any, ids_M: np.ndarray, *, progress: bool = False, desc: str = "eval",
               stride: int | None = None) -> tuple[float, int]:
    """stride: the sliding window's, instead of the protocol's (the same compilation)."""
    p = self.protocol
    if p.name == SLIDING_WINDOW:
      return evaluate_bits(self._score, params, ids_M, seq_len=p.seq_len, stride=stride or p.stride,
                           batch_size=self.batch_size, mesh=self._mesh, progress=progress, desc=desc)
    return evaluate_recurrent(self._score, params, self._empty_memory(jax.random.key(0)), ids_M,
                              seq_len=p.seq_len, batch_size=self.batch_size, mesh=self._mesh,
                              progress=progress, desc=desc)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: bpc of a checkpoint on eval.split; writes WORKDIR/eval_<split>.json and a
  metrics.jsonl record, and returns the result."""
  check_config(config, sharding.make_mesh(config))  # Before anything slow.
  corpus = data.load_corpus(config.data)
  ids_M = eval_ids(config, corpus)
  restored = inference.restore(config, workdir, corpus.vocab.size)
  split, proto, batch_size = config.eval.split, protocol(config), config.eval.batch_size
  evaluator = Evaluator(restored.model, proto, restored.mesh, restored.rules, batch_size)
  start = time.time()
  bits, count = evaluator(restored.params, ids_M, progress=True, desc=f"eval {split}")
  seconds = time.time() - start
  fields = proto.describe(len(ids_M), batch_size)
  # context and min_context: the characters each scored one sees at most and (past the start of
  # the text, or of a stream) at least.
  least = (fields["attention_length"] - min(proto.stride, fields["attention_length"]) + 1
           if proto.name == SLIDING_WINDOW
           else min(proto.mem_len + 1, fields["attention_length"]))
  result = {"split": split, "step": restored.step, "bpc": bits / count, "num_chars": count,
            **fields, "context": fields["attention_length"], "min_context": least,
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
  how = (f"stride {stride}, context {result['context']}" if result.get("protocol", SLIDING_WINDOW) == SLIDING_WINDOW else
         f"recurrent: segments of {result['seq_len']}, memory {result['mem_len']}, "
         f"attention length {result['attention_length']}")
  print(f"step {step}: {split} bpc {result['bpc']:.4f} over {count:,} characters ({how})", flush=True)
