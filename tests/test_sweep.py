"""python -m chartx.sweep: a grid of overrides on configs/tiny.py, run for real, and its table."""

import json
import os

import pytest

from chartx import metrics
from chartx.tools import plot, sweep
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_sweep_runs_every_override_and_tabulates_bpc(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # multiple_targets=x is not an int: that run fails (one line, exit 1) and the others go on.
  status = sweep.main(["--config=configs/tiny.py", f"--workdir={tmp_path}", "--quiet",
                       "--grid", "loss.multiple_targets=x,1,2", "--config.train.num_steps=4",
                       "--config.train.log_every=2", "--config.train.eval_every=4",
                       "--config.train.checkpoint_every=0"])
  captured = capsys.readouterr()
  assert status == 1
  names = ["loss.multiple_targets=x", "loss.multiple_targets=1", "loss.multiple_targets=2"]
  rows = {line.split(" | ")[0].strip("| "): line for line in captured.out.splitlines()[2:]}
  assert list(rows) == names
  assert "failed (1)" in rows[names[0]] and "config.loss.multiple_targets" in captured.err
  for name in names[1:]:
    cells = [c.strip() for c in rows[name].strip("|").split("|")]
    assert cells[2:4] == ["ok", "4"], rows[name]
    train_bpc, valid_bpc = float(cells[4]), float(cells[5])
    records = metrics.read_metrics(str(tmp_path / name))
    assert train_bpc == pytest.approx([r for r in records if "bpc" in r][-1]["bpc"], abs=1e-4)
    assert valid_bpc == pytest.approx(records[-1]["validation_bpc"], abs=1e-4)
    assert (tmp_path / name / "train.log").read_text().count("train 4/4 (100%)") == 1
  # The override reached each run: only multiple_targets=2 has a classifier 2 ahead.
  assert "weight/ahead_2" not in metrics.read_metrics(str(tmp_path / names[1]))[0]
  assert "weight/ahead_2" in metrics.read_metrics(str(tmp_path / names[2]))[0]
  assert (tmp_path / "sweep.md").read_text().strip() == captured.out.strip()
  assert [row["name"] for row in json.loads((tmp_path / "sweep.json").read_text())] == names
  # The learning curves of the runs that trained, from the sweep root.
  assert plot.find_runs([str(tmp_path)]) == [str(tmp_path / n) for n in names[1:]]
  assert plot.main([str(tmp_path)]) == 0 and (tmp_path / "curves.png").exists()


def test_sweep_file_and_grid_combine_into_named_runs(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  sweep_file = tmp_path / "ablations.py"
  sweep_file.write_text("def get_sweep():\n  return {'baseline': {}, "
                        "'no_intermediate_layers': {'loss.intermediate_layers': False}}\n")
  status = sweep.main(["--config=configs/tiny.py", f"--workdir={tmp_path}/runs", f"--sweep={sweep_file}",
                       "--grid", "model.num_layers=2,4", "--dry_run", "--config.train.num_steps=7"])
  assert status == 0
  commands = capsys.readouterr().out.splitlines()
  assert len(commands) == 4
  assert commands[0].endswith(f"--workdir={tmp_path}/runs/baseline,model.num_layers=2 "
                              "--config.model.num_layers=2 --config.train.num_steps=7")
  assert "--config.loss.intermediate_layers=False --config.model.num_layers=4" in commands[3]
  assert not (tmp_path / "runs").exists()  # A dry run writes nothing.


def test_grid_values_and_sweep_files(tmp_path):
  assert sweep.parse_grid("--config.mesh.shape=(-1,1,1),(2,2,1)") == ("mesh.shape", ["(-1,1,1)", "(2,2,1)"])
  sweep_file = tmp_path / "my_sweep.py"
  sweep_file.write_text("def get_sweep():\n  return [{'model.d_model': 64}, {'model.d_model': 128}]\n")
  assert sweep.load_sweep_file(str(sweep_file)) == {"model.d_model=64": {"model.d_model": 64},
                                                    "model.d_model=128": {"model.d_model": 128}}


@pytest.mark.parametrize("args,message", [
    (["--grid", "loss.nonexistent=1,2"], "no config key 'loss.nonexistent'"),
    (["--grid", "loss.multiple_targets"], "--grid 'loss.multiple_targets': expected KEY=VALUE1,VALUE2"),
    (["--grid", "loss.multiple_targets=1,,2"], "empty value"),
    (["--sweep=/nonexistent/sweep.py"], "--sweep=/nonexistent/sweep.py: no such file"),
    ([], "nothing to sweep"),
])
def test_bad_sweeps_get_a_one_line_error(tmp_path, capsys, monkeypatch, args, message):
  monkeypatch.chdir(ROOT)
  assert sweep.main(["--config=configs/tiny.py", f"--workdir={tmp_path}", *args]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
  with pytest.raises(UserError):
    sweep.parse_grid("=1")
