"""--mode=compile (chartx.aot): configs/tiny.py's steps compiled for a small TPU slice on this CPU
host, with libtpu (the tpu extra, which `make test` installs): the fixed family with the Pallas
splash kernel, Transformer-XL with its resets and recurrent eval step, and the command line."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from chartx import aot, sharding
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install 'chartx[tpu]')")


@pytest.fixture(scope="module")
def v5e_devices():
  config = _tiny_for("v5e:2x2")
  return aot.target_devices(config)


def _tiny_for(topology):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.compile.topology = topology
  return config


def test_topology_devices_are_the_slice(v5e_devices):
  assert len(v5e_devices) == 4
  assert {d.platform for d in v5e_devices} == {"tpu"}
  assert aot.chip(v5e_devices[0]).name == "v5e"
  # A v4-8 runs one device per chip (megacore), and multi-slice shapes multiply the devices.
  config = _tiny_for("v4:2x2x1")
  assert len(aot.target_devices(config)) == 4
  config.compile.num_slices = 2
  assert len(aot.target_devices(config)) == 8


def test_splash_lowers_with_mosaic_for_the_tpu(v5e_devices):
  """splash, refused on a CPU run, is allowed for a TPU target and lowered by Mosaic: a TPU custom
  call in the compiled eval step, not Pallas's interpreter."""
  config = _tiny_for("v5e:2x2")
  config.data.seq_len = config.model.max_len = 128  # splash's blocks are 128.
  config.model.attention = "splash"
  mesh, rules = sharding.make_mesh(config, v5e_devices), sharding.logical_rules(config)
  task, _, programs = aot.build_programs(config, mesh, rules, "tpu")
  assert (task.model_cfg.attention, task.model_cfg.dtype) == ("splash", "bfloat16")
  jitted, args = programs["eval_step"]
  assert "tpu_custom_call" in jitted.lower(*args).compile().as_text()


def test_xl_compiles_with_resets_and_memory_and_the_largest_batch(v5e_devices, tmp_path):
  config = _tiny_for("v5e:2x2")
  config.model.family, config.model.mem_len = "xl", 16
  config.eval.seq_len, config.eval.mem_len = 16, 24
  mesh, rules = sharding.make_mesh(config, v5e_devices), sharding.logical_rules(config)
  _, state, programs = aot.build_programs(config, mesh, rules, "tpu")
  assert state.memory.h_LxBxMxD.shape == (2, 8, 16, 32)
  assert programs["train_step"][1][-1].shape == (8,)  # reset_B after the rng.
  # Evaluation's memory: the projected keys and values of eval.mem_len positions.
  assert programs["eval_step"][1][1].k_LxBxNxMxH.shape[3] == 24
  result = aot.compile_config(config, str(tmp_path), v5e_devices)
  assert result["family"] == "xl" and result["train_step"]["fits"] and result["eval_step"]["fits"]
  assert result["train_step"]["alias_bytes"] > 0  # The state (its memory too) is donated.
  # The largest batch, by compiling: up to a limit of 8 windows on a large chip, none on a chip
  # of one byte.
  assert aot.largest_batch(config, mesh, rules, "tpu", aot.Chip("big", 2**40, 1e12), limit=8) == 8
  assert aot.largest_batch(config, mesh, rules, "tpu", aot.Chip("none", 1, 1e12), limit=8) == 0


def test_command_line_compiles_splash_and_writes_the_result(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("JAX_PLATFORMS", None)
  run = subprocess.run([sys.executable, "-m", "chartx.main", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}", "--mode=compile", "--config.compile.topology=v4:2x2x1",
                        "--config.data.seq_len=128", "--config.model.max_len=128",
                        "--config.model.attention=splash"],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  assert "compile: train_step:" in run.stdout and "fits" in run.stdout
  assert "E0000" not in run.stderr  # libtpu found no TPU here, and was told so: no error log.
  result = json.loads((tmp_path / "compile_v4_2x2x1.json").read_text())
  assert (result["device_kind"], result["attention"], result["num_devices"]) == ("TPU v4", "splash", 4)
  for name in ("train_step", "eval_step"):
    assert result[name]["fits"] is True
    assert 0 < result[name]["peak_bytes"] < aot.CHIPS[2][1].hbm_bytes
  # 8 windows of 128 characters at the model's count per character (2 layers, d 32, f 64, K 2).
  d, f, layers, vocab, seq = 32, 64, 2, 256, 128
  per_char = 6 * layers * (4 * d * d + 2 * d * f) + 6 * layers * seq * d + 6 * layers * 2 * d * vocab
  assert result["flops_per_step"] == pytest.approx(8 * seq * per_char)
  assert 0 < result["roofline"]["mfu"] <= 1


def test_bad_input_is_named(tiny_config, monkeypatch):
  with pytest.raises(UserError, match=r"needs config.compile.topology"):
    aot.target_devices(tiny_config)
  tiny_config.compile.topology = "tpu8"
  with pytest.raises(UserError, match=r"^config.compile.topology='tpu8' is not a TPU topology"):
    aot.target_devices(tiny_config)
  tiny_config.compile.topology = "v9:2x2"
  with pytest.raises(UserError, match=r"^config.compile.topology='v9:2x2': INVALID_ARGUMENT"):
    aot.target_devices(tiny_config)
  tiny_config.compile.topology = "v4:2x2x1"
  monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)  # As if not installed.
  with pytest.raises(UserError, match=r"pip install 'chartx\[tpu\]'"):
    aot.target_devices(tiny_config)
