"""Evaluation: every character scored once, strided totals equal brute force, --mode=eval end to end."""

import json
import math
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chartx import evaluate, inference, scoring, sharding
from chartx.families import fixed, layers, registry
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("num_chars,seq_len,stride", [
    (2, 4, 1), (5, 4, 4), (6, 4, 1), (6, 4, 3), (50, 8, 1), (50, 8, 3), (50, 8, 8), (51, 8, 5), (57, 8, 7)])
def test_windows_score_every_character_once_with_the_promised_context(num_chars, seq_len, stride):
  seq_len = min(seq_len, num_chars - 1)
  starts_W, first_W = scoring.window_starts(num_chars, seq_len, stride)
  scored = []  # (target index, characters of context)
  for w, (start, first) in enumerate(zip(starts_W, first_W)):
    for offset in range(first, seq_len):
      scored.append((start + offset + 1, offset + 1))
      if w:
        assert offset + 1 >= seq_len - stride + 1
  targets = sorted(t for t, _ in scored)
  assert targets == list(range(1, num_chars))  # Each character but the first, exactly once.
  assert starts_W[-1] + seq_len == num_chars - 1  # No window reads past the end.


def _brute_force_bits(net, params, ids_M, seq_len, stride):
  """Each target j scored on its own: a forward pass over exactly the context the protocol gives it.

  The protocol, stated independently of window_starts: targets 1..T come from the first window
  (context from the start); a later target j from the first window, among starts 0, S, 2S, ...
  and the last start N-1-T, whose targets reach j. The context is padded to T with junk after it
  (the model is causal), so that one compilation serves every context length.
  """
  logits = jax.jit(lambda tokens_1xT: net.apply({"params": params}, tokens_1xT,
                                                method=fixed.Transformer.logits))
  n = len(ids_M)
  seq_len = min(seq_len, n - 1)
  junk_T = np.random.default_rng(1).integers(0, 256, seq_len)
  total_nats = 0.0
  for j in range(1, n):
    start = 0 if j <= seq_len else min(math.ceil((j - seq_len) / stride) * stride, n - 1 - seq_len)
    context = ids_M[start:j]
    tokens_1xT = np.concatenate([context, junk_T[len(context):]])[None]
    logits_V = np.asarray(logits(tokens_1xT)[0, len(context) - 1], np.float64)
    logp_V = logits_V - logits_V.max() - np.log(np.exp(logits_V - logits_V.max()).sum())
    total_nats -= logp_V[ids_M[j]]
  return total_nats / math.log(2)


def test_strided_total_bits_equal_brute_force_for_every_stride(tiny_config):
  num_chars, seq_len = 61, 8
  tiny_config.data.seq_len = tiny_config.model.max_len = seq_len
  cfg = registry.model_config(tiny_config, 256)
  net = fixed.Transformer(cfg)
  init = jax.jit(net.init)(jax.random.key(1), jnp.zeros((1, seq_len), jnp.int32))
  params = flax.linen.unbox(init)["params"]
  ids_M = np.random.default_rng(0).integers(0, 256, num_chars).astype(np.int32)
  mesh = sharding.make_mesh(tiny_config)
  score = scoring.jit_score_fn(scoring.model_score_fn(net), mesh, sharding.logical_rules(tiny_config))
  totals = {}
  for stride in (1, 3, 8):
    bits, count = scoring.evaluate_bits(score, params, ids_M, seq_len=seq_len, stride=stride,
                                         batch_size=4, mesh=mesh)
    assert count == num_chars - 1
    np.testing.assert_allclose(bits, _brute_force_bits(net, params, ids_M, seq_len, stride), rtol=2e-6)
    totals[stride] = bits
  # Different strides give different contexts, so different totals.
  assert not np.isclose(totals[1], totals[8], rtol=1e-4)


def test_bad_eval_keys_raise_user_errors(tiny_config):
  mesh = sharding.make_mesh(tiny_config)
  tiny_config.eval.stride = tiny_config.data.seq_len + 1
  with pytest.raises(UserError, match="config.eval.stride"):
    evaluate.check_config(tiny_config, mesh)
  tiny_config.eval.stride = 1
  tiny_config.eval.max_chars = -1
  with pytest.raises(UserError, match="config.eval.max_chars"):
    evaluate.check_config(tiny_config, mesh)


def test_restore_chooses_newest_given_or_best_checkpoint(tiny_config, trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  assert inference.restore(tiny_config, workdir, 256).step == 20
  tiny_config.eval.step = 10
  assert inference.restore(tiny_config, workdir, 256).step == 10
  tiny_config.eval.best = True  # Together with a step: ambiguous.
  with pytest.raises(UserError, match="config.eval.step=10 and config.eval.best=True"):
    inference.restore(tiny_config, workdir, 256)
  tiny_config.eval.step = -1  # Only step 20 was validated, so it is the best.
  assert inference.restore(tiny_config, workdir, 256).step == 20
  tiny_config.eval.best = False
  tiny_config.eval.step = 15
  with pytest.raises(UserError, match=r"config.eval.step=15: .*steps: 10, 20"):
    inference.restore(tiny_config, workdir, 256)
  tiny_config.eval.step = -1
  with pytest.raises(UserError, match="no checkpoint in"):
    inference.restore(tiny_config, str(tmp_path), 256)


def test_eval_mode_end_to_end_matches_training_validation_on_two_devices(trained_workdir):
  workdir, overrides = trained_workdir
  # tiny's eval keys are the ones training validated with, at its last step (20). Two CPU
  # devices: the windows of each batch are split between them.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "chartx.main", "--config=configs/tiny.py",
                         f"--workdir={workdir}", *overrides, "--mode=eval"],
                        cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(workdir, "eval_validation.json"), encoding="utf-8") as f:
    result = json.load(f)
  assert {"split", "step", "bpc", "num_chars", "stride", "context"} <= set(result)
  assert (result["split"], result["step"], result["stride"], result["context"]) == ("validation", 20, 32, 32)
  assert (result["protocol"], result["attention_length"]) == ("sliding_window", 32)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  trained = [r for r in records if "validation_bpc" in r and r["step"] == 20]
  assert len(trained) == 1
  assert result["num_chars"] == trained[0]["validation_chars"]
  np.testing.assert_allclose(result["bpc"], trained[0]["validation_bpc"], rtol=1e-5)
  logged = [r for r in records if "eval_validation_bpc" in r]
  assert logged and logged[-1]["step"] == 20
  np.testing.assert_allclose(logged[-1]["eval_validation_bpc"], result["bpc"], rtol=1e-5)


def test_evaluate_checkpoint_paper_protocol_on_test_split_at_a_given_step(tiny_config, trained_workdir):
  workdir, overrides = trained_workdir
  tiny_config.data.path = overrides[0].split("=", 1)[1]
  tiny_config.eval.update(split="test", stride=1, max_chars=100, step=10)
  result = evaluate.evaluate_checkpoint(tiny_config, workdir)
  with open(os.path.join(workdir, "eval_test.json"), encoding="utf-8") as f:
    assert json.load(f) == result
  assert (result["split"], result["step"], result["stride"], result["num_chars"]) == ("test", 10, 1, 99)
  assert result["min_context"] == 32
  assert (result["protocol"], result["attention_length"]) == ("sliding_window", 32)
  assert 0 < result["bpc"] < 8.5  # A bpc, not nats or a total: ln(256)/ln(2) = 8 at chance.
