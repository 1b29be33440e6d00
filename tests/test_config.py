"""Config checks: every section's owner, all run at start-up; bad keys and values are one line."""

import os
import subprocess
import sys

import pytest

from chartx import config as config_lib
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_default_configs_pass(tiny_config):
  mesh, rules = config_lib.check(tiny_config)
  assert mesh.shape["data"] == 1 and rules


@pytest.mark.parametrize("key,value,message", [
    ("seed", -1, "config.seed must be >= 0"),
    ("train.eval_every", -1, "config.train.eval_every must be >= 0"),
    ("train.keep_checkpoints", -1, "config.train.keep_checkpoints must be >= 0"),
    ("data.seq_len", 0, r"config.data.seq_len=0 must be in \[1, config.model.max_len=32\]"),
    ("loss.aux_target_weight", -0.5, "config.loss.aux_target_weight must be >= 0"),
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate must be > 0"),
    ("optimizer.learning_rate", float("nan"), "config.optimizer.learning_rate must be > 0"),
    ("optimizer.momentum", 1.0, r"config.optimizer.momentum must be in \[0, 1\)"),
    ("optimizer.momentum", -0.1, r"config.optimizer.momentum must be in \[0, 1\)"),
    ("optimizer.weight_decay", -0.01, "config.optimizer.weight_decay must be >= 0"),
    ("loss.label_smoothing", 1.0, r"config.loss.label_smoothing must be in \[0, 1\)"),
    ("optimizer.b2", 1.0, r"config.optimizer.b2 must be in \[0, 1\)"),
    ("model.activation", "swish", "config.model.activation must be one of relu, gelu; got 'swish'"),
    ("model.init", "xavier", "config.model.init must be one of lecun, gpt2; got 'xavier'"),
    ("model.dtype", "float16", "config.model.dtype must be one of float32, bfloat16, auto"),
    ("model.attention", "flash", "config.model.attention must be one of xla, cudnn, splash, auto"),
    ("model.attention", "splash", "config.model.attention=splash needs a TPU"),
    ("eval.split", "valid", "config.eval.split must be validation or test"),
    ("eval.step", -2, "config.eval.step must be a checkpoint step or -1"),
    ("sample.num_chars", 0, "config.sample.num_chars must be >= 1"),
])
def test_each_bad_value_is_named_by_its_sections_owner(tiny_config, key, value, message):
  section, name = key.rsplit(".", 1) if "." in key else (None, key)
  (tiny_config[section] if section else tiny_config)[name] = value
  with pytest.raises(UserError, match=message):
    config_lib.check(tiny_config)


def _run_main(*overrides):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "chartx.main", "--config=configs/tiny.py",
                         "--workdir=/nonexistent/chartx_workdir", *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("overrides,line", [
    (["--config.model.nlayers=3"],
     "error: --config.model.nlayers: no such config key; did you mean num_layers?"),
    (["--config.optimizer.learning_rate=-1"],
     "error: config.optimizer.learning_rate must be > 0, got -1.0"),
    # Validation is off in this run, and the data file is missing: the bad eval key is still
    # what fails, so it was checked before any data was read (or the workdir created).
    (["--config.train.eval_every=0", "--config.eval.stride=33", "--config.data.path=/nonexistent.txt"],
     "error: config.eval.stride=33 must be in [0, data.seq_len=32] (0: data.seq_len)"),
])
def test_cli_start_up_errors_are_one_line_of_english(overrides, line):
  result = _run_main(*overrides)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [line], result.stderr[-2000:]
