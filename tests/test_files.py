"""Workdir files through fsspec URLs, tested on fsspec's in-memory filesystem (memory://): the
saved config, eval_<split>.json and its metrics record, metrics.jsonl, a sweep's logs and tables,
plots. (Orbax's epath and tensorboardX do not know memory://, so training and evaluation cannot
run end to end on it; they open gs:// themselves.)"""

import json
import os
import sys
import uuid

import fsspec
import pytest

from chartx import evaluate, files, metrics, run_config
from chartx.tools import plot, sweep
from configs import tiny


@pytest.fixture
def root(monkeypatch, tmp_path):
  """A fresh memory:// directory. tensorboardX writes a URL it does not know as a local path
  (memory:/...): the test runs in tmp_path so that it lands there."""
  monkeypatch.chdir(tmp_path)
  path = f"memory://chartx-{uuid.uuid4().hex}"
  yield path
  fs = fsspec.filesystem("memory")
  if fs.exists(path):
    fs.rm(path, recursive=True)


def test_files_read_and_write_urls(root):
  path = os.path.join(root, "a", "note.txt")
  assert files.read_text(path) is None and not files.exists(path)
  files.write_text(path, "bits per character\n")
  assert files.read_text(path) == "bits per character\n"
  assert files.exists(path) and files.is_dir(os.path.join(root, "a"))
  assert files.list_dir(root) == ["a"] and files.list_dir(os.path.join(root, "a")) == ["note.txt"]


def test_saved_config_round_trips_through_a_url(root):
  config = tiny.get_config()
  config.model.num_layers = 3
  run_config.save(config, root)
  assert files.exists(os.path.join(root, "config.json"))
  assert run_config.differences(run_config.load(root), config) == {}


def test_eval_result_and_metrics_are_written_through_a_url(root, capsys):
  result = {"split": "test", "step": 20, "bpc": 1.5, "num_chars": 99, "stride": 1, "context": 32,
            "protocol": "sliding_window", "attention_length": 32}
  evaluate.write_result(root, result, "stride 1, context 32")
  assert json.loads(files.read_text(os.path.join(root, "eval_test.json"))) == result
  (record,) = metrics.read_metrics(root)
  assert (record["step"], record["eval_test_bpc"], record["eval_test_chars"]) == (20, 1.5, 99)
  assert "step 20: test bpc 1.5000 over 99 characters" in capsys.readouterr().out


def test_sweep_log_and_plot_through_urls(root):
  run = os.path.join(root, "lr=0.01")
  status, last = sweep.run_one("r", [sys.executable, "-c", "print('step 1'); print('done')"], run,
                               echo=False)
  assert (status, last) == (0, "done")
  assert files.read_text(os.path.join(run, "train.log")) == "step 1\ndone\n"
  writer = metrics.MetricWriter(run)
  for step in (10, 20):
    writer.write(step, {"bpc": 3.0 - step / 10, "loss": 2.0, "validation_bpc": 2.9 - step / 10})
  writer.close()
  assert plot.find_runs([root]) == [run]
  out = plot.plot([run], plot.default_out([run]))
  assert out == os.path.join(run, "curves.png")
  with fsspec.open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert plot.default_out(["gs://b/sweep/a", "gs://b/sweep/b"]) == "gs://b/sweep/curves.png"
