"""python -m chartx.reproduce: every row trained on a tiny model and scored with one protocol;
bad rows are one-line errors before anything trains."""

import dataclasses
import json
import os

import pytest

from chartx.tools import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_row_runs_and_names_the_same_protocol(tmp_path, capsys):
  assert reproduce.main(["--tiny", f"--out={tmp_path}", "--steps=2", "--eval_chars=40"]) == 0
  records = reproduce.collect(str(tmp_path))
  assert [r["row"] for r in records] == list(reproduce.ROWS)
  protocols = [json.loads((tmp_path / r["row"] / "seed0" / reproduce.PROTOCOL_FILE).read_text())["protocol"]
               for r in records]
  assert all(p == protocols[0] for p in protocols)
  # Of the first 40 characters, the 39 targets but the first window's 32 (less context): 7 scored.
  assert protocols[0] == {"split": "validation", "stride": 1, "context": 32, "min_context": 32,
                          "max_chars": 40, "num_chars": 7, "layer": "last", "target": "next character"}
  # Each row trained with its change: the full recipe's heads predict 2 ahead, the ablation's not.
  configs = {r["row"]: json.loads((tmp_path / r["row"] / "seed0" / "config.json").read_text()) for r in records}
  assert configs["full"]["loss"]["multiple_targets"] == 2
  assert configs["no_multiple_targets"]["loss"]["multiple_targets"] == 1
  assert configs["sinusoid_positions"]["model"]["positions"] == "sinusoid"
  assert {c["seed"] for c in configs.values()} == {0} and {c["train"]["num_steps"] for c in configs.values()} == {2}
  table = (tmp_path / "reproduce.md").read_text()
  assert "stride 1, context 32" in table
  for record in records:
    assert f"| {record['row']} | " in table and f"{record['bpc']:.3f}" in table
  assert (tmp_path / "curves.png").exists()
  assert json.loads((tmp_path / "reproduce.json").read_text())["runs"] == records
  # A second seed of one row joins the table; the finished runs are not trained again.
  assert reproduce.main(["--tiny", f"--out={tmp_path}", "--steps=2", "--eval_chars=40", "--rows=momentum",
                         "--seeds=0,1"]) == 0
  assert "momentum seed 0: done before" in capsys.readouterr().err
  assert [r["seed"] for r in reproduce.collect(str(tmp_path)) if r["row"] == "momentum"] == [0, 1]


@pytest.mark.parametrize("args,message", [
    (["--rows=full,no_such_row"], "--rows: unknown row no_such_row; the rows are full, "),
    (["--config.model.no_such_key=1"], "--config: no config key 'model.no_such_key'"),
    (["--config.loss.layer_reduction=median"], "row full: config.loss.layer_reduction must be one of"),
    (["--seeds=a"], "--seeds=a: expected comma-separated integers"),
])
def test_bad_rows_and_overrides_are_one_line_errors_before_training(tmp_path, capsys, args, message):
  assert reproduce.main(["--tiny", f"--out={tmp_path / 'out'}", *args]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not (tmp_path / "out").exists()


def test_a_row_that_cannot_run_on_the_family_is_an_error_before_training(tmp_path, capsys, monkeypatch):
  row = dataclasses.replace(reproduce.ROWS["sinusoid_positions"], families=("another_family",))
  monkeypatch.setitem(reproduce.ROWS, "sinusoid_positions", row)
  assert reproduce.main(["--tiny", f"--out={tmp_path / 'out'}"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: row sinusoid_positions cannot run on model.family=fixed "
                 "(it runs on another_family)"]
  assert not (tmp_path / "out").exists()
