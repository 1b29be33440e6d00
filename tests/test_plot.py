"""python -m chartx.plot: a PNG of learning curves comparing runs; clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from chartx import metrics
from chartx.tools import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(workdir, num_layers: int, final_bpc: float, num_steps: int = 200) -> None:
  """metrics.jsonl records shaped like the training loop's: losses, weights, validation."""
  writer = metrics.MetricWriter(str(workdir))
  for step in range(10, num_steps + 1, 10):
    bpc = final_bpc + 4.0 * np.exp(-step / 40)
    record = {"loss": bpc * 0.7, "bpc": bpc, "chars_per_sec": 1000.0, "weight/ahead_2": 0.5}
    for layer in range(1, num_layers + 1):
      stop = layer * num_steps / (2 * num_layers) if layer < num_layers else np.inf
      record[f"weight/layer_{layer}"] = float(step < stop)
    writer.write(step, record)
    if step % 50 == 0:
      writer.write(step, {"validation_bpc": bpc + 0.1, "validation_chars": 2048})
  writer.close()


def test_plot_command_writes_a_png_comparing_two_runs(tmp_path):
  _fake_run(tmp_path / "t4", num_layers=4, final_bpc=1.5)
  _fake_run(tmp_path / "t8", num_layers=8, final_bpc=1.3)
  out = tmp_path / "curves.png"
  result = subprocess.run([sys.executable, "-m", "chartx.plot", str(tmp_path / "t4"),
                           str(tmp_path / "t8"), f"--out={out}", "--title=two runs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == f"wrote {out} (2 runs)"
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  height, width = matplotlib.image.imread(str(out)).shape[:2]
  assert width > 1000 and height > 400


def test_a_sweep_root_stands_for_its_runs_in_sweep_order(tmp_path):
  for name in ("b_run", "a_run"):
    _fake_run(tmp_path / name, num_layers=2, final_bpc=2.0, num_steps=50)
  (tmp_path / "not_a_run").mkdir()
  assert plot.find_runs([str(tmp_path)]) == [str(tmp_path / "a_run"), str(tmp_path / "b_run")]
  (tmp_path / "sweep.json").write_text(json.dumps([{"name": "b_run"}, {"name": "a_run"}]))
  runs = plot.find_runs([str(tmp_path)])
  assert runs == [str(tmp_path / "b_run"), str(tmp_path / "a_run")]
  assert plot.main([str(tmp_path)]) == 0
  assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_the_plotted_series(tmp_path):
  _fake_run(tmp_path, num_layers=4, final_bpc=1.0, num_steps=200)
  records = metrics.read_metrics(str(tmp_path))
  assert plot.eval_keys(records) == ["validation_bpc"]
  weights = plot.weight_series(records)
  steps, share = weights["intermediate layers"]
  # Layers 1..3 of 4 stop at steps 25, 50 and 75: at step 10 all are on, from 80 none.
  assert share[steps == 10] == 1.0 and share[steps == 30] == pytest.approx(2 / 3)
  assert np.all(share[steps >= 80] == 0.0)
  assert np.all(weights["2 ahead"][1] == 0.5)
  y = np.full(5, 3.0)
  np.testing.assert_allclose(plot.smooth(y), y)  # Debiased: no pull towards 0 at the start.


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
  assert plot.main([str(tmp_path / "missing")]) == 1
  assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such directory"
  assert plot.main([str(tmp_path)]) == 1
  assert "no metrics.jsonl" in capsys.readouterr().err
  _fake_run(tmp_path / "run", num_layers=2, final_bpc=2.0, num_steps=20)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # As if it were not installed.
  assert plot.main([str(tmp_path / "run")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: chartx.plot needs matplotlib: pip install 'chartx[plot]'"]
