"""Bits per character on a split, by the evaluation protocol of the model's family (its Protocol,
chartx.families.base, and Evaluator). The built-in families' two protocols:

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

Speed: docs/results.md (benchmarks/eval_sample.py, benchmarks/xl_eval.py); a larger
eval.batch_size helps stride 1 most.

    python -m chartx.main --config=configs/tiny.py --workdir=DIR --mode=eval \
        --config.eval.stride=1 --config.eval.split=test
"""

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from chartx import data, files, inference, metrics, sharding
from chartx.errors import UserError
from chartx.families import base, registry


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """The eval section's owner: every eval.* key, UserError naming a bad one."""
  e = config.eval
  if e.split not in ("validation", "test"):
    raise UserError(f"config.eval.split must be validation or test, got {e.split!r}")
  if e.same_length.lower() not in base.SAME_LENGTH:
    raise UserError(f"config.eval.same_length must be one of {', '.join(base.SAME_LENGTH)} (auto: as "
                    f"model.same_length), got {e.same_length!r}")
  registry.get(config.model.family).check_eval_config(config)  # Its protocol's keys.
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


class Evaluator:
  """evaluator(params, ids_M) -> (total bits, characters scored): a model's bits on a text by its
  family's Protocol, compiled once; training's validation, --mode=eval and chartx.load's score use it.

  model: the family's module as inference runs it (inference.inference_model; the evaluator runs
  it deterministic, last layer). batch_size: windows per batch (sliding windows) or streams
  (recurrent), a multiple of the data-parallel devices.
  """

  def __init__(self, model: Any, proto: base.Protocol, mesh: jax.sharding.Mesh, rules: sharding.Rules,
               batch_size: int):
    self.protocol, self.batch_size = proto, batch_size
    self._score = proto.scorer(registry.get(model.cfg.family), model, mesh, rules, batch_size)

  def __call__(self, params: Any, ids_M: np.ndarray, *, progress: bool = False, desc: str = "eval",
               stride: int | None = None) -> tuple[float, int]:
    """stride: the sliding window's, instead of the protocol's (the same compilation)."""
    return self._score(params, ids_M, progress=progress, desc=desc, stride=stride)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: bpc of a checkpoint on eval.split; writes WORKDIR/eval_<split>.json and a
  metrics.jsonl record, and returns the result."""
  check_config(config, sharding.make_mesh(config))  # Before anything slow.
  corpus = data.load_corpus(config.data)
  ids_M = eval_ids(config, corpus)
  restored = inference.restore(config, workdir, corpus.vocab.size)
  split, proto, batch_size = config.eval.split, restored.protocol, config.eval.batch_size
  evaluator = Evaluator(restored.model, proto, restored.mesh, restored.rules, batch_size)
  start = time.time()
  bits, count = evaluator(restored.params, ids_M, progress=True, desc=f"eval {split}")
  seconds = time.time() - start
  fields = proto.describe(len(ids_M), batch_size)
  # context and min_context: the characters each scored one sees at most and (past the start of
  # the text, or of a stream) at least.
  least = proto.min_context(fields["attention_length"])
  result = {"split": split, "step": restored.step, "bpc": bits / count, "num_chars": count,
            **fields, "context": fields["attention_length"], "min_context": least,
            "bits": bits, "max_chars": config.eval.max_chars, "seconds": round(seconds, 3),
            "chars_per_sec": count / seconds}
  if jax.process_index() == 0:
    write_result(workdir, result, proto.how(result))
  return result


def write_result(workdir: str, result: dict[str, Any], how: str) -> None:
  """WORKDIR/eval_<split>.json and a metrics.jsonl record of an evaluation, and its line on stdout
  (how: the protocol's account of it, Protocol.how)."""
  split, step, count, stride = result["split"], result["step"], result["num_chars"], result["stride"]
  files.write_text(os.path.join(workdir, f"eval_{split}.json"), json.dumps(result, indent=2) + "\n")
  writer = metrics.MetricWriter(workdir)
  writer.write(step, {f"eval_{split}_bpc": result["bpc"], f"eval_{split}_chars": count,
                      f"eval_{split}_stride": stride})
  writer.close()
  print(f"step {step}: {split} bpc {result['bpc']:.4f} over {count:,} characters ({how})", flush=True)
