"""The config travels with the run: training saves it (config.json and checkpoint metadata);
eval and sample use it without --config, with --config.KEY overrides; a given --config of another
model is refused; a resumed run names what changed and refuses what its checkpoints cannot follow."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from chartx import checkpoint, loop, run_config
from chartx.errors import UserError
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_config(overrides):
  """The config the trained_workdir fixture's command resolves to."""
  config = tiny.get_config()
  config.data.path = overrides[0].split("=", 1)[1]
  config.train.update(num_steps=20, checkpoint_every=10, eval_every=20, log_every=10)
  return config


@pytest.fixture
def run_copy(trained_workdir, tmp_path):
  """A copy of the trained workdir that a test may change, and the config it was trained with."""
  workdir, overrides = trained_workdir
  shutil.copytree(workdir, tmp_path / "run")
  return str(tmp_path / "run"), _trained_config(overrides)


def test_training_saves_the_resolved_config_beside_and_inside_its_checkpoints(trained_workdir):
  workdir, overrides = trained_workdir
  expected = _trained_config(overrides)
  with open(os.path.join(workdir, run_config.CONFIG_FILE), encoding="utf-8") as f:
    assert json.load(f) == json.loads(run_config.to_json(expected))
  saved = run_config.load(workdir)
  assert saved.mesh.rules == expected.mesh.rules and isinstance(saved.mesh.shape, tuple)
  assert run_config.differences(saved, expected) == {}
  assert run_config.differences(run_config.from_dict(checkpoint.saved_config(workdir)), expected) == {}


def test_a_copied_checkpoint_directory_keeps_the_config(run_copy):
  workdir, expected = run_copy
  os.remove(os.path.join(workdir, run_config.CONFIG_FILE))
  assert run_config.differences(run_config.load(workdir), expected) == {}
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  assert run_config.load(workdir) is None
  with pytest.raises(UserError, match="--config is not given and .* has no saved config"):
    run_config.get_config(workdir)


@pytest.mark.parametrize("argv,expected", [
    (["m", "--workdir=/w", "--mode=eval"],
     ["m", f"--config={run_config.__file__}:/w", "--workdir=/w", "--mode=eval"]),
    (["m", "--workdir", "gs://b/r", "-mode", "sample", "--config.sample.top_k=3"],
     ["m", f"--config={run_config.__file__}:gs://b/r", "--workdir", "gs://b/r", "-mode", "sample",
      "--config.sample.top_k=3"]),
    (["m", "--workdir=/w"], ["m", "--workdir=/w"]),  # Training needs its --config.
    (["m", "--config=c.py", "--workdir=/w", "--mode=eval"],
     ["m", "--config=c.py", "--workdir=/w", "--mode=eval"]),
])
def test_eval_and_sample_without_config_get_the_saved_one(argv, expected):
  assert run_config.config_argv(argv) == expected
  assert run_config.is_saved(expected[1].split("=", 1)[1]) == (argv != expected)


def test_a_given_config_of_another_model_or_data_is_an_error_naming_the_keys(trained_workdir):
  workdir, overrides = trained_workdir
  config = _trained_config(overrides)
  config.eval.update(split="test", stride=1)  # Another evaluation: fine.
  config.model.dtype = "bfloat16"  # How the model is computed, not what it is: fine.
  run_config.check_given(config, workdir)
  config.model.num_layers = 3
  config.data.seq_len = 16
  with pytest.raises(UserError) as raised:
    run_config.check_given(config, workdir)
  message = str(raised.value)
  assert "\n" not in message
  assert "data.seq_len 32 -> 16, model.num_layers 2 -> 3" in message


def test_eval_without_config_uses_the_saved_one_and_its_overrides(run_copy):
  workdir, _ = run_copy
  proc = subprocess.run([sys.executable, "-m", "chartx.main", f"--workdir={workdir}", "--mode=eval",
                         "--config.eval.max_chars=300", "--config.eval.step=10"],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(workdir, "eval_validation.json"), encoding="utf-8") as f:
    result = json.load(f)
  # The saved run's data and stride (tiny: 32), this command's prefix and step.
  assert (result["step"], result["max_chars"], result["num_chars"], result["stride"]) == (10, 300, 299, 32)


def test_train_without_config_is_a_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "chartx.main", f"--workdir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: --config is required for --mode=train (eval and sample use the run's saved config)"]


def test_resuming_with_another_model_shape_or_data_is_refused(run_copy):
  workdir, config = run_copy
  config.model.num_layers = 3
  config.loss.multiple_targets = 1
  with pytest.raises(UserError, match=r"^loss.multiple_targets 2 -> 1, model.num_layers 2 -> 3: a "
                                      r"resumed run cannot change what its checkpoints hold"):
    loop.train_and_evaluate(config, workdir)


def test_resuming_with_other_settings_says_what_changed_and_saves_them(run_copy, capsys):
  workdir, config = run_copy
  config.optimizer.learning_rate = 0.005
  config.eval.max_chars = 512
  loop.train_and_evaluate(config, workdir)  # Already at num_steps: restores, runs no step.
  out = capsys.readouterr().out
  assert ("train: config changed since the saved run: eval.max_chars 2048 -> 512, "
          "optimizer.learning_rate 0.01 -> 0.005") in out
  assert run_config.differences(run_config.load(workdir), config) == {}


def test_a_config_saved_before_a_key_existed_gets_its_default(tmp_path):
  values = json.loads(run_config.to_json(tiny.get_config()))
  del values["train"]["grad_accum_steps"], values["log"]  # Keys newer than the saved run.
  values["mesh"]["shape"] = [2, 1, 1]
  (tmp_path / run_config.CONFIG_FILE).write_text(json.dumps(values))
  saved = run_config.load(str(tmp_path))
  assert saved.train.grad_accum_steps == 1 and saved.log.wandb_project == ""
  assert saved.mesh.shape == (2, 1, 1) and saved.model.num_layers == 2


@pytest.mark.parametrize("per_layer,positions", [(True, "per_layer"), (False, "input")])
def test_a_config_saved_with_per_layer_positions_reads_as_model_positions(tmp_path, per_layer, positions):
  values = json.loads(run_config.to_json(tiny.get_config()))
  del values["model"]["positions"]
  values["model"]["per_layer_positions"] = per_layer  # The key model.positions replaced.
  (tmp_path / run_config.CONFIG_FILE).write_text(json.dumps(values))
  saved = run_config.load(str(tmp_path))
  assert saved.model.positions == positions and "per_layer_positions" not in saved.model
