"""log.wandb_project: the training records and config go to W&B from process 0, and a resumed
run continues the same W&B run. wandb itself is replaced by a recorder (it is an optional extra);
the last test runs the real one in offline mode where it is installed."""

import glob
import importlib.machinery
import os
import sys
import types

import pytest

from chartx import config as config_lib
from chartx import loop, wandb_writer
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


def test_training_logs_records_and_config_and_a_resumed_run_continues_it(tiny_config, tmp_path,
                                                                         fake_wandb):
  (tmp_path / "text.txt").write_text("weights and biases of a character model. " * 200)
  tiny_config.data.path = str(tmp_path / "text.txt")
  tiny_config.log.wandb_project = "chartx-tests"
  tiny_config.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir)
  (first,) = fake_wandb
  with open(os.path.join(workdir, wandb_writer.RUN_ID_FILE), encoding="utf-8") as f:
    run_id = f.read().strip()
  assert first["init"]["id"] == run_id and first["init"]["resume"] == "allow"
  assert first["init"]["project"] == "chartx-tests" and first["init"]["entity"] is None
  assert first["init"]["config"] == tiny_config.to_dict()
  assert [step for step, _ in first["logs"]] == [2, 4, 4]  # Training at 2 and 4, validation at 4.
  assert {"loss", "bpc", "chars_per_sec", "grad_norm"} <= set(first["logs"][0][1])
  assert "validation_bpc" in first["logs"][2][1] and first["finished"]
  tiny_config.train.num_steps = 6
  loop.train_and_evaluate(tiny_config, workdir)  # Resumes at step 4.
  second = fake_wandb[1]
  assert second["init"]["id"] == run_id
  assert [step for step, _ in second["logs"]] == [6, 6]


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
