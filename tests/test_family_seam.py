"""The family seam: a third family (tests/toy_family.py, registered from tests/ alone, nothing in
chartx/ names it) trains, resumes, evaluates and samples through python -m chartx.main's code
(chartx.main's flags and run(), in a process that imports the plugin first)."""

import json
import os
import subprocess
import sys

import numpy as np

import chartx
from chartx import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# python -m chartx.main, after importing the plugin that registers the family.
MAIN = ("import sys; sys.path.insert(0, 'tests'); import toy_family; from absl import app; "
        "from chartx import main; app.run(main.main, flags_parser=main._parse_flags)")


def _main(workdir, *args):
  proc = subprocess.run([sys.executable, "-c", MAIN, "--config=configs/tiny.py", f"--workdir={workdir}",
                         *args], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  return proc


def test_a_family_registered_from_tests_trains_resumes_evaluates_and_samples(tmp_path):
  text = " ".join(np.random.default_rng(0).choice("the of and to in is model".split(), 3000)) + "\n"
  (tmp_path / "text.txt").write_text(text)
  workdir = str(tmp_path / "workdir")
  toy = [f"--config.data.path={tmp_path / 'text.txt'}", "--config.model.family=toy",
         "--config.model.num_layers=1", "--config.train.checkpoint_every=4", "--config.train.log_every=1"]
  _main(workdir, *toy, "--config.train.num_steps=4")  # Stops with the checkpoint of step 4.
  _main(workdir, *toy, "--config.train.num_steps=8", "--config.train.eval_every=8")
  straight = str(tmp_path / "straight")
  _main(straight, *toy, "--config.train.num_steps=8", "--config.train.eval_every=8")
  losses = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}
  assert sorted(losses) == list(range(1, 9))
  # Resumed from step 4, steps 5..8 are bit for bit those of the run that never stopped.
  assert losses == {r["step"]: r["loss"] for r in metrics.read_metrics(straight) if "loss" in r}
  assert losses[8] < losses[1]  # It learns.
  assert any("validation_bpc" in r for r in metrics.read_metrics(workdir) if r["step"] == 8)

  _main(workdir, *toy, "--mode=eval", "--config.eval.max_chars=200")
  result = json.loads((tmp_path / "workdir" / "eval_validation.json").read_text())
  assert (result["step"], result["protocol"], result["num_chars"]) == (8, "sliding_window", 199)
  assert 0 < result["bpc"] < 8

  sampled = _main(workdir, *toy, "--mode=sample", "--config.sample.prompt=the ",
                  "--config.sample.num_chars=30", "--config.sample.temperature=0")
  # Greedy: --mode=sample's continuation is chartx.load's, in this process (the plugin imported here).
  import toy_family  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (registers it)
  run = chartx.load(workdir)
  assert type(run.model).__name__ == "OneLayer" and run.step == 8
  continuation = run.generate("the ", 30, temperature=0.0)
  assert sampled.stdout == "the " + continuation + "\n" and len(continuation) > 0
