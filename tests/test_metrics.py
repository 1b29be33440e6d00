"""Observability: a short run's TensorBoard events and metrics.jsonl, resume, progress, MFU, README.

TensorBoard's own reader (tensorboard.backend.event_processing) reads the event files; no
TensorFlow is installed.
"""

import contextlib
import io
import json
import math
import os
import re
import types

import flax
import jax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from chartx import flops, loop, metrics
from chartx import progress as progress_lib
from configs import default, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _doc_section(title: str, path: str = "README.md") -> str:
  """The section of the markdown file at path (relative to the repository) that starts at title."""
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    text = f.read()
  start = text.index(title)
  end = text.find("\n## ", start + len(title))
  return text[start:end if end != -1 else len(text)]


def _documented_key_patterns() -> list[re.Pattern]:
  """The metrics.jsonl keys docs/reference.md's table documents, placeholders (<l>, <k>, <split>)
  as regexes."""
  section = _doc_section("**metrics.jsonl**", "docs/reference.md")
  patterns = []
  for row in section.splitlines():
    if row.startswith("| `"):
      for key in re.findall(r"`([^`]+)`", row.split("|")[1]):
        regex = re.escape(key).replace(re.escape("<l>"), r"\d+").replace(re.escape("<k>"), r"\d+")
        patterns.append(re.compile(regex.replace(re.escape("<split>"), r"[a-z]+")))
  return patterns


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """6 steps of configs/tiny.py (logged every 2, validated at the end), and its progress output."""
  config = tiny.get_config()
  config.train.num_steps, config.train.log_every = 6, 2
  config.train.eval_every, config.train.checkpoint_every = 6, 0
  workdir = tmp_path_factory.mktemp("run")
  stderr = io.StringIO()  # Not a terminal: the progress is plain lines.
  with contextlib.redirect_stderr(stderr):
    loop.train_and_evaluate(config, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return workdir, records, stderr.getvalue()


def test_short_run_writes_every_metric_to_tensorboard_and_jsonl(short_run):
  workdir, records, _ = short_run
  training = [r for r in records if "loss" in r]
  assert [r["step"] for r in training] == [2, 4, 6]
  expected = {"loss", "bpc", "chars_per_sec", "grad_norm", "learning_rate", "loss/layer_1",
              "loss/layer_2", "loss/layer_1_ahead_2", "loss/layer_2_ahead_2", "weight/layer_1",
              "weight/layer_2", "weight/ahead_2"}
  assert expected <= training[0].keys()
  assert "mfu" not in training[0]  # No known peak on a CPU.
  validation = [r for r in records if "validation_bpc" in r]
  assert [r["step"] for r in validation] == [6] and validation[0]["validation_chars"] > 0

  scalars = _scalars(workdir)
  for record in records:
    for key, value in record.items():
      if key in ("step", "wall_time", "elapsed"):
        continue
      assert (record["step"], pytest.approx(value, rel=1e-6)) in scalars[key], key
  assert set(scalars) == {k for r in records for k in r} - {"step", "wall_time", "elapsed"}


def test_records_carry_wall_time_and_elapsed_and_only_documented_keys(short_run):
  _, records, _ = short_run
  patterns = _documented_key_patterns()
  for record in records:
    for key in record:
      assert any(p.fullmatch(key) for p in patterns), (f"{key} is not in docs/reference.md's "
                                                       "metrics table")
  elapsed = [r["elapsed"] for r in records]
  assert elapsed == sorted(elapsed) and elapsed[0] >= 0
  assert abs(records[-1]["wall_time"] - records[0]["wall_time"] - (elapsed[-1] - elapsed[0])) < 0.01


def test_progress_off_a_terminal_is_plain_lines_with_rate_and_eta(short_run):
  _, _, output = short_run
  lines = output.splitlines()
  assert lines[0].startswith("train: ") and "parameters" in lines[0] and "no MFU" in lines[0]
  steps = [line for line in lines if re.match(r"train \d+/6 \(\d+%\)", line)]
  assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]
  assert all("step/s" in line and "ETA" in line and "bpc " in line and "chars/s " in line
             for line in steps)
  assert any(line.startswith("step 6  validation bpc ") for line in lines)
  assert "\r" not in output


def test_a_resumed_writer_supersedes_what_the_crashed_session_logged(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), start_step=0)
  for step in (1, 2, 3):
    writer.write(step, {"bpc": float(step)})
  writer.close()
  first_elapsed = metrics.read_metrics(str(tmp_path))[-1]["elapsed"]
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4, "bp')  # Killed in the middle of a line.
  writer = metrics.MetricWriter(str(tmp_path), start_step=2)  # Resumed from the step-2 checkpoint.
  writer.write(3, {"bpc": 30.0})
  writer.close()

  records = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["bpc"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  assert records[-1]["elapsed"] >= first_elapsed  # The clock goes on across sessions.
  assert _scalars(tmp_path)["bpc"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_remote_workdir_is_written_through_fsspec(tmp_path, monkeypatch):
  pytest.importorskip("fsspec")
  monkeypatch.chdir(tmp_path)  # tensorboardX treats an unknown scheme as a local path.
  url = f"memory://chartx_test_{os.getpid()}/run"
  writer = metrics.MetricWriter(url)
  writer.write(1, {"bpc": 2.5})
  writer.close()
  writer = metrics.MetricWriter(url, start_step=1)
  writer.write(2, {"bpc": 2.0})
  writer.close()
  assert [(r["step"], r["bpc"]) for r in metrics.read_metrics(url)] == [(1, 2.5), (2, 2.0)]


def test_progress_lines_every_update_or_only_when_asked():
  out = io.StringIO()
  with progress_lib.Progress(10, "eval", unit="batch", every_secs=0, file=out) as progress:
    for i in range(10):
      progress.update(1, bpc=f"{i}.5")
  lines = out.getvalue().splitlines()
  assert len(lines) == 11
  assert lines[4].startswith("eval 5/10 (50%)  ") and "batch/s" in lines[4] and "ETA " in lines[4]
  assert lines[4].endswith("bpc 4.5")
  assert lines[-1].startswith("eval 10/10 in ")

  out = io.StringIO()
  progress = progress_lib.Progress(None, "prepare", unit="MB", every_secs=math.inf, file=out)
  progress.update(50)
  progress.update(0, line=True, split="train")
  progress.close()
  lines = out.getvalue().splitlines()
  assert len(lines) == 2 and lines[0].startswith("prepare 50 MB  ") and lines[0].endswith("split train")

  silent = io.StringIO()
  with progress_lib.Progress(3, "x", enabled=False, file=silent) as progress:
    progress.update(3, line=True)
    progress.write("not shown")
  assert silent.getvalue() == ""


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
  class Terminal(io.StringIO):
    def isatty(self):
      return True
  monkeypatch.setenv("TERM", "xterm")
  out = Terminal()
  progress = progress_lib.Progress(5, "eval", file=out)
  progress.update(2, bpc="1.2345")
  progress.write("a line above the bar")
  progress.close()
  text = out.getvalue()
  assert "\r" in text
  assert "eval:  40%" in text and "bpc 1.2345" in text and "a line above the bar\n" in text


def test_format_helpers():
  assert [progress_lib.format_duration(s) for s in (3.2, 125, 7384, 200000, math.inf)] == \
      ["3s", "2m05s", "2h03m", "2d07h", "?"]
  assert [progress_lib.format_number(x) for x in (987, 35236, 2.1e9)] == ["987", "35.2k", "2.1G"]


@pytest.mark.parametrize("platform,kind,peak", [
    ("tpu", "TPU v2", 22.5e12),  # A device is one of a chip's two TensorCores.
    ("tpu", "TPU v3", 61.5e12),
    ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5", 459e12),
    ("tpu", "TPU v6 lite", 918e12),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312e12),
    ("gpu", "NVIDIA H100 80GB HBM3", 989.5e12),
    ("gpu", "NVIDIA H100 PCIe", 756.5e12),
    ("gpu", "NVIDIA H200", 989.5e12),
    ("gpu", "NVIDIA GeForce RTX 3090", None),
    ("cpu", "cpu", None),
])
def test_peak_flops_of_known_accelerators(platform, kind, peak):
  device = types.SimpleNamespace(platform=platform, device_kind=kind)
  assert flops.peak_flops(device) == (pytest.approx(peak) if peak else None)


def test_peak_flops_of_this_cpu_is_unknown():
  assert flops.peak_flops(jax.devices("cpu")[0]) is None


def test_reference_documents_every_config_key():
  section = _doc_section("## Config reference", "docs/reference.md")
  documented = set(re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M))
  keys = set(flax.traverse_util.flatten_dict(default.get_config().to_dict(), sep="."))
  assert keys - documented == set(), ("add these configs/default.py keys to docs/reference.md's "
                                      "config reference")
  assert documented - keys == set(), "docs/reference.md documents config keys that do not exist"


def test_readme_layout_map_is_true_to_the_files():
  section = _doc_section("## Architecture")
  # One table row per module; its first cell is the path in backquotes.
  listed = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
  missing = [path for path in listed if not os.path.exists(os.path.join(ROOT, path))]
  assert not missing, f"README.md's layout map lists files that do not exist: {missing}"
  modules = {f"chartx/{name}" for name in os.listdir(os.path.join(ROOT, "chartx"))
             if name.endswith(".py") and name != "__init__.py"}
  assert modules - set(listed) == set(), "add these modules to README.md's layout map"
