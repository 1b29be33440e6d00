"""Config checks: every section's owner, all run at start-up; bad keys and values are one line."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from chartx import config as config_lib
from chartx.errors import UserError
from chartx.families import registry
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_default_configs_pass(tiny_config):
  mesh, rules = config_lib.check(tiny_config)
  assert mesh.shape["data"] == 1 and rules


@pytest.mark.parametrize("key,value,message", [
    ("seed", -1, "config.seed must be >= 0"),
    ("train.eval_every", -1, "config.train.eval_every must be >= 0"),
    ("train.keep_checkpoints", -1, "config.train.keep_checkpoints must be >= 0"),
    ("data.seq_len", 0, "config.data.seq_len must be >= 1, got 0"),
    ("data.seq_len", 33, r"config.data.seq_len=33 must be <= config.model.max_len=32, the rows of the "
                         r"positional table \(model.positions=per_layer\)"),
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


def test_only_a_positional_table_bounds_seq_len(tiny_config):
  """model.max_len bounds the fixed family's windows where they read a positional table; rotary
  positions and Transformer-XL (no absolute positions) take windows and segments longer than it."""
  for family, positions in (("fixed", "rope"), ("xl", "per_layer")):
    config = tiny.get_config()
    config.model.update(family=family, positions=positions, mem_len=16 if family == "xl" else 0)
    config.data.seq_len = 3 * config.model.max_len
    config_lib.check(config)
  tiny_config.model.positions = "rope"
  tiny_config.data.seq_len = 48
  net = registry.build(registry.model_config(tiny_config, 64))
  tokens_1xT = jnp.zeros((1, 48), jnp.int32)
  params = net.init(jax.random.key(0), tokens_1xT)
  assert net.apply(params, tokens_1xT).shape == (1, 48, 32)


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
    (["--config.data.seq_len=64"], "error: config.data.seq_len=64 must be <= config.model.max_len=32, "
                                   "the rows of the positional table (model.positions=per_layer)"),
])
def test_cli_start_up_errors_are_one_line_of_english(overrides, line):
  result = _run_main(*overrides)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [line], result.stderr[-2000:]
