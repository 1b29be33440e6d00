"""log.wandb_project: the training records and config go to W&B from process 0, and a resumed
run continues the same W&B run. wandb itself is replaced by a recorder (it is an optional extra);
the last test runs the real one in offline mode where it is installed."""

import glob
import importlib.machinery
import os
import sys
import types

import numpy as np
import pytest

from chartx import config as config_lib
from chartx import report, train, wandb_writer
from chartx.errors import UserError


@pytest.fixture
def fake_wandb(monkeypatch):
  """A stand-in wandb module; returns the list of runs it started, each {"init": kwargs, "logs": []}."""
  runs = []

  def init(**kwargs):
    run = {"init": kwargs, "logs": [], "finished": False}
    runs.append(run)
    return types.SimpleNamespace(log=lambda data, step: run["logs"].append((step, data)),
                                 finish=lambda: run.update(finished=True))

  module = types.ModuleType("wandb")
  module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
  module.init = init
  monkeypatch.setitem(sys.modules, "wandb", module)
  return runs


def _reporter(config, workdir, start_step):
  """The training loop's Reporter, without a model run: the task's shapes are all it needs."""
  task = train.make_task(config, 256)
  return report.Reporter(config, task, workdir, start_step, num_params=1)


def _out(config, loss):
  """A train step's results as the loop hands them to the Reporter."""
  layers, targets = config.model.num_layers, config.loss.multiple_targets
  return {"loss": np.float32(loss), "bpc": np.float32(loss / 2), "grad_norm": np.float32(1),
          "learning_rate": np.float32(0.01), "nll": np.full((layers, targets), loss, np.float32),
          "loss_weights": np.ones((layers, targets), np.float32)}


def test_training_records_and_config_go_to_one_wandb_run_across_sessions(tiny_config, tmp_path,
                                                                         fake_wandb):
  tiny_config.log.wandb_project = "chartx-tests"
  tiny_config.train.update(num_steps=6, log_every=2)
  workdir = str(tmp_path / "run")
  reporter = _reporter(tiny_config, workdir, 0)
  for step in range(1, 5):
    reporter.step_done(step, _out(tiny_config, 5.0 - step))
  reporter.validation(4, {"validation_bpc": 2.5, "validation_chars": 100})
  reporter.close()
  (first,) = fake_wandb
  with open(os.path.join(workdir, wandb_writer.RUN_ID_FILE), encoding="utf-8") as f:
    run_id = f.read().strip()
  assert first["init"]["id"] == run_id and first["init"]["resume"] == "allow"
  assert first["init"]["project"] == "chartx-tests" and first["init"]["entity"] is None
  assert first["init"]["config"] == tiny_config.to_dict()
  assert [step for step, _ in first["logs"]] == [2, 4, 4]  # Training at 2 and 4, validation at 4.
  assert {"loss", "bpc", "chars_per_sec", "grad_norm", "loss/layer_1"} <= set(first["logs"][0][1])
  assert first["logs"][2][1] == {"validation_bpc": 2.5, "validation_chars": 100}
  assert first["finished"]
  reporter = _reporter(tiny_config, workdir, 4)  # A resumed session.
  reporter.step_done(5, _out(tiny_config, 1.0))
  reporter.step_done(6, _out(tiny_config, 0.5))
  reporter.close()
  second = fake_wandb[1]
  assert second["init"]["id"] == run_id
  assert [step for step, _ in second["logs"]] == [6]


def test_other_processes_and_runs_without_a_project_start_no_wandb_run(tiny_config, tmp_path,
                                                                       fake_wandb):
  assert wandb_writer.open_writer(tiny_config, str(tmp_path), enabled=True) is None
  tiny_config.log.wandb_project = "p"
  assert wandb_writer.open_writer(tiny_config, str(tmp_path), enabled=False) is None
  assert fake_wandb == [] and not os.listdir(tmp_path)


@pytest.mark.parametrize("keys,message", [
    ({"wandb_project": "my/project"}, r"config.log.wandb_project='my/project': W&B names cannot"),
    ({"wandb_project": "p", "wandb_entity": "a team"}, "config.log.wandb_entity='a team'"),
    ({"wandb_entity": "team"}, "config.log.wandb_entity is set but config.log.wandb_project is not"),
])
def test_bad_log_keys_are_one_line_errors(tiny_config, fake_wandb, keys, message):
  tiny_config.log.update(keys)
  with pytest.raises(UserError, match=message):
    config_lib.check(tiny_config)


def test_wandb_missing_is_named_at_start_up(tiny_config, monkeypatch):
  monkeypatch.setattr(wandb_writer.importlib.util, "find_spec", lambda name: None)  # Not installed.
  tiny_config.log.wandb_project = "p"
  with pytest.raises(UserError, match=r"config.log.wandb_project needs wandb: pip install"):
    config_lib.check(tiny_config)


def test_real_wandb_offline_keeps_one_run_across_sessions(tiny_config, tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  tiny_config.log.wandb_project = "chartx-tests"
  for step in (1, 2):  # Two sessions of one training run.
    writer = wandb_writer.WandbWriter(tiny_config, str(tmp_path))
    writer.write(step, {"bpc": 3.0 / step})
    writer.close()
  with open(tmp_path / wandb_writer.RUN_ID_FILE, encoding="utf-8") as f:
    run_id = f.read().strip()
  assert glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
