"""Training end to end: overfitting a short text, the CLI, and one-line errors for bad input."""

import functools
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from chartx import data, loop, train
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_model_overfits_a_short_text_below_half_a_bit(tiny_config):
  text = b"the quick brown fox jumps over the lazy dog. " * 4
  ids_M = np.frombuffer(text, np.uint8)
  tiny_config.optimizer.name = "adamw"
  tiny_config.optimizer.learning_rate = 0.01
  tiny_config.optimizer.momentum = 0.9
  tiny_config.train.num_steps = 300
  task = train.make_task(tiny_config, 256)
  seq_len = tiny_config.data.seq_len
  state = flax.linen.unbox(jax.jit(functools.partial(train.init_state, task, seq_len=seq_len))(
      jax.random.key(0)))
  step_fn = jax.jit(functools.partial(train.train_step, task), donate_argnums=0)
  for step in range(tiny_config.train.num_steps):
    windows = data.train_batch(ids_M, seed=0, step=step, batch_size=8, length=seq_len + 2)
    state, metrics = step_fn(state, windows, jax.random.key(1))
  assert float(metrics["bpc"]) < 0.5


def _run_main(*args, cwd=ROOT):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "chartx.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_trains_tiny_with_falling_loss_and_writes_metrics(tmp_path):
  workdir = tmp_path / "run"
  result = _run_main("--config=configs/tiny.py", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50]
  for r in train_records:
    assert {"step", "loss", "bpc", "chars_per_sec"} <= r.keys()
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  valid = [r["validation_bpc"] for r in records if "validation_bpc" in r]
  assert len(valid) == 2 and valid[1] < valid[0]


@pytest.mark.parametrize("override,culprit", [
    ("--config.model.nonexistent=3", "--config.model.nonexistent"),
    ("--config.data.seq_len=64", "config.data.seq_len"),
    ("--config.train.batch_size=0", "config.train.batch_size"),
    ("--config.model.num_heads=3", "config.model.num_heads"),
    ("--config.data.path=/nonexistent/file.txt", "/nonexistent/file.txt"),
    ("--config.mesh.shape=(2,1,1)", "config.mesh.shape"),
    ("--config.optimizer.name=rmsprop", "config.optimizer.name"),
    ("--config.model.attention=cudnn", "config.model.attention"),
])
def test_bad_input_gets_a_one_line_error_naming_the_culprit(tmp_path, override, culprit):
  result = _run_main("--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", override)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert culprit in lines[0]


def test_empty_text_file_is_named(tmp_path, tiny_config):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  tiny_config.data.path = str(empty)
  with pytest.raises(UserError, match="empty.txt"):
    loop.train_and_evaluate(tiny_config, str(tmp_path / "run"))


def test_loop_compiles_the_step_then_releases_freed_memory_once_per_run(tmp_path, tiny_config, monkeypatch):
  """The loop compiles its train step before the first step runs and then returns the compiler's
  freed memory (malloc.release_freed_memory): once, before any step is done, and again once in a
  resumed run, whose restored state the compiled step takes as it is."""
  from chartx import malloc  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  calls = []
  monkeypatch.setattr(malloc, "release_freed_memory",
                      lambda: calls.append(os.path.exists(workdir / "metrics.jsonl")
                                           and os.path.getsize(workdir / "metrics.jsonl")))
  tiny_config.train.update(num_steps=3, log_every=1, eval_every=3, checkpoint_every=3)
  state = loop.train_and_evaluate(tiny_config, str(workdir))
  assert int(state.step) == 3 and calls == [0]  # metrics.jsonl had no record yet.
  tiny_config.train.num_steps = 5
  state = loop.train_and_evaluate(tiny_config, str(workdir))
  assert int(state.step) == 5 and len(calls) == 2 and calls[1] > 0
