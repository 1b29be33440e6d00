"""benchmarks/gpu_check: the whole check at tiny dims on CPU, its failure handling, its flags, and
the commands benchmarks/gpu_check.sh would run on the GPU machine (no timing assertions)."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import jax
import pytest

from benchmarks import gpu_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
POSITIVE_TRAIN = ("compile_total_s", "step_time_s", "chars_per_sec", "flops_per_char", "peak_memory_bytes")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks what a CPU records (no MFU, no cuDNN)")
def test_tiny_check_fills_every_section_and_records_the_failed_ones(tmp_path):
  """cuDNN attention cannot run on a CPU: its sections fail, are recorded, and the rest still run."""
  out = tmp_path / "new" / "gpu_check.json"
  done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", f"--out={out}", "--tiny",
                         "--attention=xla,cudnn"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr
  report = json.loads(out.read_text())
  names = ["train/T12/xla", "train/T12/cudnn", "train/T64/xla", "train/T64/cudnn", "train/XL12/xla",
           "train/XL12/cudnn", "infer/T12", "infer/T64", "infer/XL12"]
  assert list(report["sections"]) == names
  assert report["errors"] == ["train/T12/cudnn", "train/T64/cudnn", "train/XL12/cudnn"]
  assert report["skipped"] == []
  assert report["backend"] == "cpu" and report["num_devices"] == 1
  assert report["versions"]["jax"] == jax.__version__ and report["versions"]["ml-collections"]
  assert report["tiny"] and "--tiny" in report["command"] and report["finished"]
  assert report["targets"] == {"T12": {"mfu_target": 0.40, "mfu_best": None, "met": None},
                                "T64": {"mfu_target": 0.45, "mfu_best": None, "met": None}}
  for name in ("train/T12/xla", "train/T64/xla", "train/XL12/xla"):
    section = report["sections"][name]
    assert section["status"] == "ok", section
    result = section["result"]
    for key in POSITIVE_TRAIN:
      assert result[key] > 0, (name, key)
    assert result["mfu"] is None  # No datasheet peak for a CPU.
    assert result["num_layers"] == 2 and result["dtype"] == "float32" and result["attention"] == "xla"
  assert report["sections"]["train/T64/xla"]["result"]["remat"] == "dots"  # T64's own setting kept.
  for name in ("train/T12/cudnn", "train/T64/cudnn", "train/XL12/cudnn"):
    section = report["sections"][name]
    assert section["status"] == "error" and "cudnn" in section["result"]["error"]
  for name in ("infer/T12", "infer/T64"):
    section = report["sections"][name]
    assert section["status"] == "ok", section
    for key in ("eval_stride_1_chars_per_sec", "eval_stride_64_chars_per_sec",
                "sample_cached_chars_per_sec", "peak_memory_bytes"):
      assert section["result"][key] > 0, (name, key)
  xl = report["sections"]["infer/XL12"]
  assert xl["status"] == "ok", xl
  assert xl["result"]["lengths"] == [32, 64] and xl["result"]["peak_memory_bytes"] > 0
  for length in (32, 64):  # With the cached memory: a memory of length - 1, same_length.
    rec = xl["result"][f"xl_{length}"]
    assert rec["xl_chars_per_sec"] > 0 and rec["xl_sample_chars_per_sec"] > 0, rec
    assert rec["xl_mem_len"] == length - 1
  lines = done.stdout.splitlines()
  assert [line.split()[0] for line in lines[:-1]] == names
  assert lines[-1].startswith("gpu_check: ") and str(out) in lines[-1]


def test_spent_budget_skips_every_section_and_still_writes_the_file(tmp_path):
  out = tmp_path / "gpu_check.json"
  args = gpu_check.parse_args([f"--out={out}", "--budget_s=0", "--models=T12", "--attention=cudnn"])
  report = gpu_check.run_check(args, [])
  assert json.loads(out.read_text()) == report
  assert report["skipped"] == ["train/T12/cudnn", "infer/T12"] and report["errors"] == []
  assert all(s["status"] == "skipped" and "--budget_s=0" in s["reason"] for s in report["sections"].values())


def test_targets_take_the_best_attention_choice_that_ran():
  ok = lambda mfu: {"status": "ok", "result": {"mfu": mfu}}
  sections = {"train/T12/xla": ok(0.30), "train/T12/cudnn": ok(0.41),
              "train/T64/xla": ok(0.44), "train/T64/cudnn": {"status": "error", "result": {"error": "x"}},
              "infer/T12": {"status": "ok", "result": {}}}
  assert gpu_check.targets(sections, ["T12", "T64"]) == {
      "T12": {"mfu_target": 0.40, "mfu_best": 0.41, "met": True},
      "T64": {"mfu_target": 0.45, "mfu_best": 0.44, "met": False}}


@pytest.mark.parametrize("child, timeout_s, message", [
    ("import sys; sys.stderr.write('Segmentation fault'); sys.exit(139)", 60, "status 139"),
    ("import time; time.sleep(30)", 0.5, "budget"),
])
def test_a_section_that_crashes_or_overruns_is_recorded(monkeypatch, tmp_path, child, timeout_s, message):
  monkeypatch.setattr(gpu_check, "_child_argv", lambda *_: [sys.executable, "-c", child])
  args = gpu_check.parse_args([f"--out={tmp_path / 'x.json'}"])
  record = gpu_check.run_child(args, "train/T12/xla", timeout_s)
  assert message in record["result"]["error"]
  assert gpu_check._failures(record) == ["result"]  # pylint: disable=protected-access


@pytest.mark.parametrize("argv, culprit", [
    (["--budget_s=-1"], "--budget_s"),
    (["--steps=0"], "--steps"),
    (["--warmup=-1"], "--warmup"),
    (["--eval_windows=0"], "--eval_windows"),
    (["--models=T12,T99"], "T99"),
    (["--attention=flash"], "flash"),
    (["--section=train/T12/flash"], "--section"),
    (["--bogus"], "--bogus"),
])
def test_bad_flags_are_one_line_naming_the_culprit(tmp_path, capsys, argv, culprit):
  with pytest.raises(SystemExit) as exit_info:
    gpu_check.parse_args([f"--out={tmp_path / 'x.json'}", *argv])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and culprit in err


def test_out_must_be_given_and_be_a_file(tmp_path, capsys):
  for argv, culprit in (([], "--out"), ([f"--out={tmp_path}"], "--out")):
    with pytest.raises(SystemExit):
      gpu_check.parse_args(argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and culprit in err


def test_the_check_path_needs_no_tfds_torch_or_tensorflow():
  """The GPU machine carries only the wheels gpu_check.sh downloads: importing everything the
  check runs must not reach tensorflow_datasets, array_record, tensorflow or torch."""
  blocked = ("tensorflow_datasets", "array_record", "tensorflow", "torch")
  code = (f"import sys\nclass Block:\n  def find_spec(self, name, path=None, target=None):\n"
          f"    if name.split('.')[0] in {blocked!r}: raise ImportError('blocked: ' + name)\n"
          "sys.meta_path.insert(0, Block())\n"
          "import benchmarks.gpu_check, benchmarks.eval_sample\n"
          "import chartx.tools.bench, chartx.evaluate, chartx.sample\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr


def _sh(*args: str, cwd: pathlib.Path = ROOT, script: pathlib.Path = SCRIPT) -> subprocess.CompletedProcess:
  env = {"PATH": os.environ["PATH"], "OUT": "/results", "HOME": os.environ.get("HOME", "/tmp")}
  return subprocess.run(["bash", str(script), *args], cwd=cwd, capture_output=True, text=True,
                        timeout=30, env=env, check=False)


def test_sh_dry_run_installs_beside_the_system_packages_then_runs_the_check():
  done = _sh("--dry-run", "--budget_s=300")
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert len(lines) == 2
  install, check = (shlex.split(line) for line in lines)
  assert install[:4] == ["python3", "-m", "pip", "install"]
  assert {"--no-index", "--no-deps"} <= set(install) and install[install.index("--target") + 1] == ".gpu_site"
  wheels = install[install.index("--target") + 2:]  # The glob, expanded where .wheels/ is filled.
  assert wheels and all(w.startswith(".wheels/") and w.endswith(".whl") for w in wheels)
  assert check == ["PYTHONPATH=.:.gpu_site", "python3", "-m", "benchmarks.gpu_check",
                   "--out=/results/gpu_check.json", "--budget_s=300"]


def test_sh_download_dry_run_fetches_the_missing_packages_as_wheels():
  done = _sh("--download", "--dry-run")
  assert done.returncode == 0, done.stderr
  (download,) = (shlex.split(line) for line in done.stdout.splitlines())
  assert download[:4] == ["python3", "-m", "pip", "download"]
  assert {"--no-deps", "--only-binary=:all:"} <= set(download)
  assert download[download.index("--python-version") + 1] == "3.12"
  assert download[download.index("-d") + 1] == ".wheels"
  assert {w.split("==")[0] for w in download if "==" in w} == {"ml-collections", "tensorboardX"}


def test_sh_without_wheels_is_one_line(tmp_path):
  (tmp_path / "benchmarks").mkdir()
  script = shutil.copy(SCRIPT, tmp_path / "benchmarks" / "gpu_check.sh")
  done = _sh(script=pathlib.Path(script), cwd=tmp_path)
  assert done.returncode == 1 and done.stdout == ""
  assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "--download" in done.stderr
