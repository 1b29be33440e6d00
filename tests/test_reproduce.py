"""python -m chartx.reproduce: every row trained on a tiny model and scored with one protocol;
bad rows are one-line errors before anything trains."""

import dataclasses
import json
import os

import pytest

from chartx.tools import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_step_times(config, steps):
  """A step of Transformer-XL takes twice the fixed model's here."""
  del steps
  return {"fixed": 0.5, "xl": 1.0}[config.model.family]


def test_every_row_runs_and_names_the_same_protocol(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(reproduce, "measure_step_time", fake_step_times)
  assert reproduce.main(["--tiny", f"--out={tmp_path}", "--steps=4", "--eval_chars=40"]) == 0
  records = reproduce.collect(str(tmp_path))
  assert [r["row"] for r in records] == list(reproduce.ROWS)
  protocols = {r["row"]: json.loads((tmp_path / r["row"] / "seed0" / reproduce.PROTOCOL_FILE).read_text())["protocol"]
               for r in records}
  xl_protocol = protocols.pop("xl")
  protocols = list(protocols.values())
  assert all(p == protocols[0] for p in protocols)
  # Of the first 40 characters, the 39 targets but the first window's 32 (less context): 7 scored.
  assert protocols[0] == {"split": "validation", "stride": 1, "context": 32, "min_context": 32,
                          "max_chars": 40, "num_chars": 7, "layer": "last", "target": "next character"}
  # Transformer-XL: the same 7, after a first segment of 32 (a memory of 32 of its 64): 33 to 39.
  assert xl_protocol == {"split": "validation", "protocol": "recurrent", "seq_len": 32, "mem_len": 64,
                         "clamp_len": 0, "same_length": False, "streams": 1, "context": 39, "min_context": 33,
                         "max_chars": 40, "num_chars": 7, "layer": "last", "target": "next character"}
  # Each row trained with its change: the full recipe's heads predict 2 ahead, the ablation's not.
  configs = {r["row"]: json.loads((tmp_path / r["row"] / "seed0" / "config.json").read_text()) for r in records}
  assert configs["full"]["loss"]["multiple_targets"] == 2
  assert configs["no_multiple_targets"]["loss"]["multiple_targets"] == 1
  assert configs["sinusoid_positions"]["model"]["positions"] == "sinusoid"
  # xl trains for the time of full's 4 steps: 2 steps, a step taking twice as long.
  xl_config = configs.pop("xl")
  assert (xl_config["model"]["family"], xl_config["model"]["mem_len"], xl_config["train"]["num_steps"]) == ("xl", 64, 2)
  assert {c["model"]["family"] for c in configs.values()} == {"fixed"}
  assert {c["seed"] for c in configs.values()} == {0} and {c["train"]["num_steps"] for c in configs.values()} == {4}
  xl_record = records[-1]
  assert xl_record["steps"] == 2 and xl_record["time_of"] == {
      "row": "full", "steps": 4, "seconds_per_step": {"full": 0.5, "xl": 1.0}, "trained_steps": 2}
  table = (tmp_path / "reproduce.md").read_text()
  assert "4 steps per run; " in table and "stride 1, context 32" in table
  assert ("Row xl: trained for the time of full's 4 steps, 2 steps (1.000 s a step against 0.500 s, timed "
          "back to back before training)") in table
  assert ("read recurrently as one stream in segments of 32 with a memory of 64 (clamp_len 0, same_length "
          "False): every scored character sees 33 to 39 characters before it.") in table
  full_bpc = next(r["bpc"] for r in records if r["row"] == "full")
  assert f"| xl | {reproduce.ROWS['xl'].change} | 0 | {xl_record['bpc']:.3f} | {xl_record['bpc']:.3f} | " \
         f"{xl_record['bpc'] - full_bpc:+.3f} | " in table
  for record in records:
    assert f"| {record['row']} | " in table and f"{record['bpc']:.3f}" in table
  assert (tmp_path / "curves.png").exists()
  assert json.loads((tmp_path / "reproduce.json").read_text())["runs"] == records
  # A second seed of one row joins the table; the finished runs are not trained again, and xl's
  # second seed trains the steps of its first (the step times are kept, not measured again).
  monkeypatch.setattr(reproduce, "measure_step_time", None)
  assert reproduce.main(["--tiny", f"--out={tmp_path}", "--steps=4", "--eval_chars=40", "--rows=momentum,xl",
                         "--seeds=0,1"]) == 0
  assert "momentum seed 0: done before" in capsys.readouterr().err
  records = reproduce.collect(str(tmp_path))
  assert [r["seed"] for r in records if r["row"] == "momentum"] == [0, 1]
  assert [(r["seed"], r["steps"]) for r in records if r["row"] == "xl"] == [(0, 2), (1, 2)]


def test_the_step_times_are_measured_for_each_family():
  """measure_step_time runs chartx.tools.bench on the row's own config, Transformer-XL included."""
  base = reproduce.base_config(tiny=True)
  configs = reproduce.run_configs(base, ["full", "xl"], [0], 2)
  for name in ("full", "xl"):
    assert 0 < reproduce.measure_step_time(configs[name, 0], 2) < 60


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


def test_xl_is_a_row_of_the_fixed_family_only(tmp_path, capsys):
  assert reproduce.main(["--tiny", f"--out={tmp_path / 'out'}", "--rows=xl", "--config.model.family=xl",
                         "--config.eval.stride=0"]) == 1
  assert capsys.readouterr().err.strip().splitlines() == [
      "error: row xl cannot run on model.family=xl (it runs on fixed)"]
  assert not (tmp_path / "out").exists()


def test_a_row_that_cannot_run_on_the_family_is_an_error_before_training(tmp_path, capsys, monkeypatch):
  row = dataclasses.replace(reproduce.ROWS["sinusoid_positions"], families=("another_family",))
  monkeypatch.setitem(reproduce.ROWS, "sinusoid_positions", row)
  assert reproduce.main(["--tiny", f"--out={tmp_path / 'out'}"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: row sinusoid_positions cannot run on model.family=fixed "
                 "(it runs on another_family)"]
  assert not (tmp_path / "out").exists()
