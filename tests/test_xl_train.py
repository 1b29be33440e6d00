"""Transformer-XL outside the model (chartx/families/xl.py's own tests are tests/test_xl.py): the memory in
the train state (resets, accumulation), recurrent evaluation scoring every character once, the
protocol fields of eval_<split>.json for both families, sampling with the memory, the configs,
the one-line errors, and the evaluation-speed benchmark at tiny dims."""

import dataclasses
import functools
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

from chartx import config as config_lib
from chartx import cpu_devices, data, evaluate, inference, run_config, sample, scoring, sharding, train
from chartx.families import base, fixed, layers, registry, xl
from chartx.errors import UserError
from configs import enwik8_xl_12l, enwik8_xl_24l, text8_xl_12l, text8_xl_24l, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xl_config(config):
  """configs/tiny.py as a Transformer-XL: a memory of 16, no positional tables."""
  config.model.family = "xl"
  config.model.mem_len = 16
  return config


def _state(task, seq_len):
  """A fresh train state, unboxed, on the default device."""
  return flax.linen.unbox(jax.jit(functools.partial(train.init_state, task, seq_len=seq_len))(
      jax.random.key(0)))


# --- The train step with a memory --------------------------------------------------------------


def test_the_state_carries_the_memory_and_a_reset_starts_a_row_afresh(tiny_config):
  """Each step leaves the memory of its segments; a reset row computes as with an empty memory,
  the other rows as with theirs (the loss is a mean over rows, so one row's change shows)."""
  config = xl_config(tiny_config)
  config.loss.intermediate_layers, config.loss.multiple_targets = False, 1
  task = train.make_task(config, 256)
  state = _state(task, config.data.seq_len)
  assert state.memory.h_LxBxMxD.shape == (2, 8, 16, 32) and not state.memory.valid_B.any()
  ids_M = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint8)
  step = jax.jit(functools.partial(train.train_step, task))
  rng = jax.random.key(1)
  windows_BxS, reset_B = data.stream_batch(ids_M, step=0, batch_size=8, seq_len=32, num_targets=1)
  state, _ = step(state, windows_BxS, rng, reset_B)
  assert state.memory.valid_B.tolist() == [16] * 8 and int(state.step) == 1
  windows_BxS, _ = data.stream_batch(ids_M, step=1, batch_size=8, seq_len=32, num_targets=1)
  outs = {}
  for name, reset_B in (("none", np.zeros(8, bool)), ("row 3", np.arange(8) == 3), ("all", np.ones(8, bool))):
    after, outs[name] = step(state, windows_BxS, rng, reset_B)
  fresh = state.replace(memory=jax.tree.map(jnp.zeros_like, state.memory))
  _, outs["empty memory"] = step(fresh, windows_BxS, rng, np.zeros(8, bool))
  assert float(outs["all"]["loss"]) == pytest.approx(float(outs["empty memory"]["loss"]), rel=1e-6)
  assert float(outs["none"]["loss"]) != pytest.approx(float(outs["all"]["loss"]), rel=1e-4)
  assert len({round(float(o["loss"]), 6) for o in (outs["none"], outs["row 3"], outs["all"])}) == 3
  np.testing.assert_array_equal(after.memory.valid_B, [16] * 8)


def test_accumulation_splits_the_memory_rows_with_the_batch(tiny_config):
  """Two micro-batches (rows 0, 2, 4, 6 and 1, 3, 5, 7, each with its streams' memory) give the
  update and the new memory of one batch (no dropout: up to float rounding)."""
  config = xl_config(tiny_config)
  ids_M = np.random.default_rng(1).integers(0, 256, 4000).astype(np.uint8)
  results = []
  for accum in (1, 2):
    config.train.grad_accum_steps = accum
    task = train.make_task(config, 256)
    state = _state(task, config.data.seq_len)
    step = jax.jit(functools.partial(train.train_step, task))
    for s in range(2):
      windows_BxS, reset_B = data.stream_batch(ids_M, step=s, batch_size=8, seq_len=32, num_targets=2)
      state, out = step(state, windows_BxS, jax.random.key(0), reset_B)
    results.append((state, out))
  (one, out_one), (two, out_two) = results
  np.testing.assert_allclose(out_two["loss"], out_one["loss"], rtol=1e-5)
  np.testing.assert_allclose(two.memory.h_LxBxMxD, one.memory.h_LxBxMxD, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(two.memory.valid_B, one.memory.valid_B)
  for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- Recurrent evaluation ----------------------------------------------------------------------


def _direct_stream_bits(net, params, ids_M, start, stop, seq_len):
  """One stream, targets start+1..stop, read segment by segment with a batch of one row and the
  memory: every target's nll summed in float64, straight from the model's logits."""
  memory = xl.init_memory(net.cfg, 1)
  logits = jax.jit(lambda tokens_1xT, memory: net.apply({"params": params}, tokens_1xT, memory,
                                                        method="logits"))
  nats = 0.0
  for lo in range(start, stop, seq_len):
    hi = min(lo + seq_len, stop)
    logits_1xTxV, memory = logits(ids_M[lo:hi][None], memory)
    logits_TxV = np.asarray(logits_1xTxV[0], np.float64)
    logp_TxV = logits_TxV - logits_TxV.max(-1, keepdims=True)
    logp_TxV -= np.log(np.exp(logp_TxV).sum(-1, keepdims=True))
    nats -= logp_TxV[np.arange(hi - lo), ids_M[lo + 1:hi + 1]].sum()
  return nats / math.log(2)


@pytest.mark.parametrize("num_chars,streams,same_length", [(301, 4, False), (203, 2, True)])
def test_recurrent_evaluation_scores_every_character_once_as_a_direct_loop(tiny_config, num_chars,
                                                                           streams, same_length):
  """Batched over contiguous streams (the last one shorter, or empty), padded to whole segments:
  the total bits equal those of a direct loop over each stream alone, and every target counts once."""
  config = xl_config(tiny_config)
  config.eval.seq_len, config.eval.mem_len = 12, 20
  config.eval.same_length = str(same_length).lower()
  proto = registry.get(config.model.family).protocol(config)
  assert (proto.name, proto.seq_len, proto.mem_len, proto.same_length) == ("recurrent", 12, 20, same_length)
  task = train.make_task(config, 256)
  params = _state(task, config.data.seq_len).params
  mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
  evaluator = evaluate.Evaluator(inference.inference_model(task.model, proto), proto, mesh, rules, streams)
  ids_M = np.random.default_rng(2).integers(0, 256, num_chars).astype(np.int32)
  bits, count = evaluator(params, ids_M)
  assert count == num_chars - 1
  net = inference.inference_model(task.model, proto)
  assert net.cfg.mem_len == 20 and net.cfg.same_length == same_length
  stream_len = -(-(num_chars - 1) // streams)
  want = sum(_direct_stream_bits(net, params, ids_M, b * stream_len, min((b + 1) * stream_len, num_chars - 1),
                                 12) for b in range(streams) if b * stream_len < num_chars - 1)
  np.testing.assert_allclose(bits, want, rtol=2e-5)


@pytest.mark.parametrize("num_chars,streams,per_stream", [
    (24, 5, [5, 5, 5, 5, 3]),  # 23 targets: the last stream shorter.
    (6, 4, [2, 2, 1, 0]),  # 5 targets: the last stream empty.
])
def test_stream_segments_cover_each_target_once_in_order(num_chars, streams, per_stream):
  ids_M = np.arange(num_chars)  # Each id is its position.
  inputs_BxP, targets_BxP, mask_BxP = scoring.stream_segments(ids_M, seq_len=2, batch_size=streams)
  assert inputs_BxP.shape[0] == streams and inputs_BxP.shape[1] % 2 == 0
  np.testing.assert_array_equal(np.sort(targets_BxP[mask_BxP]), np.arange(1, num_chars))
  np.testing.assert_array_equal(targets_BxP[mask_BxP], inputs_BxP[mask_BxP] + 1)
  assert mask_BxP.sum(1).tolist() == per_stream
  for b in range(streams):  # In order within a stream, the padding after it.
    np.testing.assert_array_equal(inputs_BxP[b, :per_stream[b]], b * per_stream[0] + np.arange(per_stream[b]))
    assert not mask_BxP[b, per_stream[b]:].any()


def test_protocol_fields_of_both_families(tiny_config):
  fixed = registry.get(tiny_config.model.family).protocol(tiny_config)
  assert fixed == base.SlidingWindow(seq_len=32, stride=32)  # eval.stride 0: seq_len.
  assert fixed.describe(1000, 8) == {"protocol": "sliding_window", "attention_length": 32, "stride": 32}
  assert fixed.attention_length(10, 8) == 9  # No more than the text before the last character.
  config = xl_config(tiny_config)
  config.eval.mem_len, config.eval.seq_len = 100, 8
  assert registry.get(config.model.family).protocol(config).describe(1000, 8) == {
      "protocol": "recurrent", "attention_length": 108, "stride": 8, "seq_len": 8, "mem_len": 100,
      "clamp_len": 0, "same_length": False, "streams": 8}
  config.model.same_length = True  # eval.same_length "auto": as the model.
  assert registry.get(config.model.family).protocol(config).attention_length(1000, 8) == 101
  assert registry.get(config.model.family).protocol(config).attention_length(1000, 32) == 32  # Streams of 32 characters.
  config.eval.same_length, config.eval.mem_len, config.eval.clamp_len = "false", -1, 7
  assert registry.get(config.model.family).protocol(config) == base.Recurrent(seq_len=8, stride=8, mem_len=16,
                                                        clamp_len=7, same_length=False)


# --- Sampling with the memory ------------------------------------------------------------------


def test_recurrent_sampling_reads_each_character_once_and_runs_for_10000(tiny_config):
  """Greedy generation (inference's Cache of projected keys and values) equals a direct loop
  feeding one character at a time with training's Memory;
  10,000 characters run in one compiled loop (cost per character fixed by the memory)."""
  config = xl_config(tiny_config)
  task = train.make_task(config, 256)
  params = _state(task, config.data.seq_len).params
  net = registry.build(task.model_cfg)
  greedy = sample.SamplingConfig(temperature=0.0)
  prompt_C, length = sample.prompt_block(np.frombuffer(b"def main(", np.uint8), 64)
  decoder = registry.get(net.cfg.family).decoder(net, 0)
  ids_M = np.asarray(sample.make_recurrent_generate(decoder, num_chars=40, sampling=greedy)(
      {"params": params}, prompt_C, length, jax.random.key(0)))
  step = jax.jit(sample.read_char(decoder))  # With training's Memory: every key projected again.
  memory, want = xl.init_memory(net.cfg, 1), []
  for token in b"def main(":
    logits_1xV, memory = step({"params": params}, jnp.asarray([[token]]), memory)
  for _ in range(40):
    want.append(int(jnp.argmax(logits_1xV[0])))
    logits_1xV, memory = step({"params": params}, jnp.asarray([[want[-1]]]), memory)
  assert ids_M.tolist() == want  # Past the memory's 16 rows: nothing re-encoded, nothing lost.
  long_M = sample.make_recurrent_generate(decoder, num_chars=10_000, sampling=sample.SamplingConfig(top_k=20))(
      {"params": params}, prompt_C, length, jax.random.key(1))
  assert long_M.shape == (10_000,) and 0 <= int(long_M.min()) and int(long_M.max()) < 256


# --- Configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module,millions", [(enwik8_xl_12l, 41), (enwik8_xl_24l, 277),
                                             (text8_xl_12l, 41), (text8_xl_24l, 277)])
def test_xl_configs_load_check_and_build(module, millions):
  """Each config passes every section's check and builds (abstractly) at the paper's size."""
  config = module.get_config()
  config.mesh.shape = (1, 1, 1)
  config_lib.check(config)
  assert config.model.family == "xl" and config.eval.stride == 0
  vocab = data.vocab_for(config.data)
  task = train.make_task(config, vocab.size)
  abstract = jax.eval_shape(functools.partial(train.init_state, task, seq_len=config.data.seq_len),
                            jax.random.key(0))
  count = layers.count_params(flax.linen.unbox(abstract.params))
  assert abs(count / 1e6 - millions) < 0.03 * millions, count
  memory = flax.linen.unbox(abstract.memory)
  assert memory.h_LxBxMxD.shape == (config.model.num_layers, config.train.batch_size,
                                    config.model.mem_len, config.model.d_model)
  proto = registry.get(config.model.family).protocol(config)
  assert proto.name == "recurrent" and proto.same_length and proto.mem_len > config.model.mem_len


# --- One-line errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("family,key,value,message", [
    ("xl", "eval.stride", 1, "config.eval.stride=1 is the fixed family's sliding window; "
                             "model.family=xl evaluates recurrently"),
    ("xl", "eval.mem_len", -2, r"config.eval.mem_len must be >= -1 \(-1: as in training\)"),
    ("xl", "eval.same_length", "yes", "config.eval.same_length must be one of auto, true, false"),
    ("fixed", "eval.mem_len", 100, "config.eval.mem_len=100 is Transformer-XL's recurrent evaluation; "
                                  "model.family=fixed evaluates with a sliding window"),
    ("fixed", "eval.same_length", "true", "config.eval.same_length='true' is Transformer-XL's"),
])
def test_an_eval_mode_the_family_does_not_have_is_a_user_error(tiny_config, family, key, value, message):
  if family == "xl":
    xl_config(tiny_config)
  section, name = key.split(".")
  tiny_config[section][name] = value
  with pytest.raises(UserError, match=message):
    config_lib.check(tiny_config)


def test_eval_same_length_needs_a_memory(tiny_config):
  config = xl_config(tiny_config)
  config.eval.same_length, config.eval.mem_len = "true", 0
  with pytest.raises(UserError, match="config.eval.same_length=true needs a memory"):
    config_lib.check(config)


def test_a_resumed_run_cannot_change_family_memory_or_streams(tiny_config, tmp_path):
  run_config.save(xl_config(tiny_config), str(tmp_path))
  for key, value in (("model.family", "fixed"), ("model.mem_len", 8), ("train.batch_size", 4)):
    config = xl_config(run_config.get_config(str(tmp_path)))
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=f"{key} .* a resumed run cannot change what its checkpoints hold"):
      run_config.resume_changes(config, str(tmp_path))


def test_max_len_is_fixed_on_resume_for_the_fixed_family_only(tiny_config, tmp_path):
  """model.max_len is the rows of the fixed family's positional tables, which XL has none of."""
  for family, refused in (("fixed", True), ("xl", False)):
    saved = xl_config(tiny.get_config()) if family == "xl" else tiny.get_config()
    run_config.save(saved, str(tmp_path / family))
    config = run_config.get_config(str(tmp_path / family))
    config.model.max_len = 64
    if refused:
      with pytest.raises(UserError, match="model.max_len .* a resumed run cannot change"):
        run_config.resume_changes(config, str(tmp_path / family))
    else:
      assert "model.max_len" in run_config.resume_changes(config, str(tmp_path / family))


def test_xl_trains_and_evaluates_on_segments_longer_than_max_len(tiny_config, tmp_path):
  """No absolute positions, so no bound: segments of 48 in training and 40 in evaluation with
  model.max_len 32 (the fixed family refuses data.seq_len 33: tests/test_config.py)."""
  config = xl_config(tiny_config)
  config.data.seq_len, config.eval.seq_len = 48, 40
  assert config.model.max_len == 32
  config.train.update(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  config.eval.max_chars = 1024
  from chartx import loop  # pylint: disable=import-outside-toplevel
  assert int(loop.train_and_evaluate(config, str(tmp_path)).step) == 2
  result = evaluate.evaluate_checkpoint(config, str(tmp_path))
  # 8 streams of 128 targets: segments of 40 with a memory of 16.
  assert (result["seq_len"], result["mem_len"], result["attention_length"]) == (40, 16, 56)
  assert result["num_chars"] == 1023 and 0 < result["bpc"] < 9


def test_too_short_a_split_for_the_streams_is_named_before_training(tiny_config, tmp_path):
  config = xl_config(tiny_config)
  text = tmp_path / "short.txt"
  text.write_text("x" * 3000)  # 2,700 training characters: 8 streams of 337, segments of 32 fit.
  config.data.path = str(text)
  config.train.batch_size = 96  # 96 streams of 28: no room for 32 + 2.
  from chartx import loop  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="train.batch_size=96 streams of 28, has no room"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


# --- The benchmark -----------------------------------------------------------------------------


def test_xl_eval_benchmark_runs_at_tiny_dims():
  done = subprocess.run([sys.executable, "-m", "benchmarks.xl_eval", "--tiny", "--lengths=32"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  records = [json.loads(line) for line in lines if line.startswith("{")]
  assert [r["attention_length"] for r in records] == [32]
  for r in records:
    assert r["fixed_chars_per_sec"] > 0 and r["xl_chars_per_sec"] > 0 and r["xl_mem_len"] == r["attention_length"] - 1
    assert r["fixed_sample_chars_per_sec"] > 0 and r["xl_sample_chars_per_sec"] > 0
    # Each ratio is the median of the rounds' (XL and the fixed model timed in turn).
    for key in ("xl_over_fixed", "xl_over_fixed_sample"):
      assert len(r[key + "_rounds"]) == 3 and r[key] == pytest.approx(sorted(r[key + "_rounds"])[1])
      assert min(r[key + "_rounds"]) > 0
    assert r["xl_calls"] >= 3 and r["fixed_calls"] >= 3  # Each side timed in each of 3 rounds.
  assert "| attention length | eval: fixed, stride 1 (chars/s) | eval: XL, recurrent (chars/s) |" in done.stdout
  # One CPU device per core, as chartx.main --mode=eval splits them (batch 2: at most 2).
  assert f"cpu x {min(2, cpu_devices.usable_cores())} (" in done.stdout


# --- A trained Transformer-XL through the command line and chartx.load --------------------------


def _main(workdir, *args):
  return subprocess.run([sys.executable, "-m", "chartx.main", f"--workdir={workdir}", *args], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=600)


def test_xl_eval_mode_writes_the_recurrent_protocol_and_matches_training_validation(trained_xl_workdir):
  """--mode=eval with the run's saved config: the same recurrent protocol as the validation at
  step 20, so the same bpc; eval_validation.json says how it was scored."""
  workdir, _ = trained_xl_workdir
  proc = _main(workdir, "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval_validation.json"), encoding="utf-8") as f:
    result = json.load(f)
  # The validation split (1,465 characters) in tiny's 8 streams; segments of 16, a memory of 24.
  assert {k: result[k] for k in ("protocol", "attention_length", "seq_len", "mem_len", "same_length",
                                 "streams", "stride", "num_chars", "step")} == {
      "protocol": "recurrent", "attention_length": 40, "seq_len": 16, "mem_len": 24,
      "same_length": False, "streams": 8, "stride": 16, "num_chars": 1464, "step": 20}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    validated = [json.loads(line) for line in f if "validation_bpc" in line]
  assert validated[0]["validation_chars"] == result["num_chars"]
  np.testing.assert_allclose(result["bpc"], validated[0]["validation_bpc"], rtol=1e-5)
  assert "recurrent: segments of 16, memory 24, attention length 40" in proc.stdout


def test_xl_sample_mode_and_load(trained_xl_workdir):
  workdir, _ = trained_xl_workdir
  proc = _main(workdir, "--mode=sample", "--config.sample.prompt=the ", "--config.sample.num_chars=100")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("the ") and len(proc.stdout) > len("the ") + 1
  import chartx  # pylint: disable=import-outside-toplevel
  run = chartx.load(workdir)
  assert run.model.cfg.family == "xl" and run.model.cfg.mem_len == 24  # The eval memory.
  assert 0 < run.score("the model predict the character") < 9
  with pytest.raises(UserError, match="stride=1 is the fixed family's sliding window"):
    run.score("the model", stride=1)
  assert len(run.generate("the ", 50, temperature=0.0)) == 50
