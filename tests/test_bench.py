"""chartx.bench: runs on a tiny config and writes a well-formed JSON line (no timing assertions)."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from chartx import train
from chartx.tools import bench
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_KEYS = ("steps", "warmup", "loss", "step_times_s", "step_time_s", "step_time_mean_s", "step_time_min_s",
             "step_cpu_time_s", "chars_per_sec", "flops_per_char", "flops_per_sec",
             "peak_flops_per_sec", "peak_flops_source", "mfu", "peak_memory_bytes",
             "peak_memory_source")
COMPILE_KEYS = ("params", "lower_s", "compile_s", "compile_total_s", "backend", "device_kind",
                "num_devices", "num_layers", "d_model", "seq_len", "batch_size", "dtype", "attention")
TORCH_KEYS = ("torch_version", "torch_threads", "torch_params", "torch_peak_memory_bytes", "torch_loss",
              "torch_step_time_s", "torch_step_cpu_time_s", "torch_chars_per_sec", "chartx_over_torch")


def _check_step_record(record: dict, config) -> None:
  for key in COMPILE_KEYS + STEP_KEYS:
    assert key in record, key
  assert record["compile_total_s"] == pytest.approx(record["lower_s"] + record["compile_s"])
  assert len(record["step_times_s"]) == record["steps"]
  assert record["step_time_s"] == pytest.approx(np.median(record["step_times_s"]))
  assert 0 < record["step_time_min_s"] <= record["step_time_s"]
  tokens = config.train.batch_size * config.data.seq_len
  assert record["chars_per_sec"] == pytest.approx(tokens / record["step_time_s"])
  assert record["flops_per_sec"] == pytest.approx(record["flops_per_char"] * record["chars_per_sec"])
  assert math.isfinite(record["loss"]) and record["loss"] > 0
  assert record["peak_memory_bytes"] > 0
  # No peak FLOP/s is known for a CPU: the record says so instead of inventing an MFU.
  assert record["mfu"] is None and record["peak_flops_per_sec"] is None
  assert "cpu" in record["peak_flops_source"]


def test_cli_appends_one_json_line(tmp_path, tiny_config):
  out = tmp_path / "bench.jsonl"
  cmd = [sys.executable, "-m", "chartx.bench", "--config=configs/tiny.py", "--steps=2",
         "--warmup=1", f"--out={out}", "--config.model.num_layers=3"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  printed = [line for line in result.stdout.splitlines() if line.startswith("{")]
  lines = out.read_text().splitlines()
  assert len(printed) == 1 and lines == printed
  record = json.loads(lines[0])
  tiny_config.model.num_layers = 3
  _check_step_record(record, tiny_config)
  assert record["config"] == "configs/tiny.py"
  assert record["overrides"] == {"model.num_layers": 3}
  assert record["num_layers"] == 3 and record["steps"] == 2 and record["vocab_size"] == 256
  # The parameter count is that of the model the train step really initializes.
  task = train.make_task(tiny_config, 256)
  state = jax.eval_shape(lambda: train.init_state(task, jax.random.key(0), tiny_config.data.seq_len))
  assert record["params"] == sum(x.size for x in jax.tree.leaves(state.params))
  assert record["flops_per_char"] == task.model_cfg.flops_per_char(tiny_config.data.seq_len)


def test_bf16_auto_attention_remat_runs_on_cpu(tiny_config):
  """The GPU settings (bf16 compute, attention 'auto', remat) run through the bench on CPU."""
  tiny_config.model.dtype = "bfloat16"
  tiny_config.model.attention = "auto"
  tiny_config.model.remat = "dots"
  record = bench.benchmark(tiny_config, steps=1, warmup=1)
  _check_step_record(record, tiny_config)
  # "auto" is resolved when the config is read: the blockwise kernel on a CPU.
  assert record["dtype"] == "bfloat16" and record["attention"] == "xla"


def test_compile_only_has_no_step_keys(tiny_config):
  tiny_config.data.name = "text8"
  record = bench.benchmark(tiny_config, compile_only=True)
  for key in COMPILE_KEYS:
    assert key in record, key
  assert not set(STEP_KEYS) & set(record)
  assert record["vocab_size"] == 27  # From config.data.name.


def test_torch_side_by_side(tiny_config):
  pytest.importorskip("torch")
  tiny_config.loss.intermediate_layers = False
  record = bench.benchmark(tiny_config, steps=2, warmup=0, with_torch=True)
  _check_step_record(record, tiny_config)
  for key in TORCH_KEYS:
    assert key in record, key
  assert record["torch_params"] == record["params"]
  assert np.isfinite(record["torch_loss"])
  assert record["chartx_over_torch"] == pytest.approx(record["torch_step_time_s"] / record["step_time_s"])
  assert record["chartx_over_torch_min"] == pytest.approx(
      record["torch_step_time_min_s"] / record["step_time_min_s"])
  assert len(record["torch_step_times_s"]) == len(record["step_times_s"]) == 2
  assert record["chartx_over_torch_paired"] == pytest.approx(
      np.median(np.divide(record["torch_step_times_s"], record["step_times_s"])))


@pytest.mark.parametrize("kwargs, culprit", [
    ({"steps": 0}, "--steps"),
    ({"warmup": -1}, "--warmup"),
    ({"vocab_size": -2}, "--vocab_size"),
])
def test_bad_flags_raise_user_error(tiny_config, kwargs, culprit):
  with pytest.raises(UserError, match=culprit):
    bench.benchmark(tiny_config, **kwargs)


def test_torch_needs_the_paper_step(tiny_config):
  tiny_config.optimizer.name = "adamw"
  with pytest.raises(UserError, match="config.optimizer.name"):
    bench.benchmark(tiny_config, with_torch=True)


@pytest.mark.parametrize("positions", ["sinusoid", "rope"])
def test_torch_needs_learned_positions(tiny_config, positions):
  tiny_config.model.positions = positions
  with pytest.raises(UserError, match=f"config.model.positions must be per_layer or input; got '{positions}'"):
    bench.benchmark(tiny_config, with_torch=True)


def test_cli_bad_override_is_one_line():
  result = subprocess.run([sys.executable, "-m", "chartx.bench", "--config=configs/tiny.py",
                           "--config.model.no_such_key=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert "--config.model.no_such_key" in result.stderr
