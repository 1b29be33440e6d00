"""A failing write mid-run (a full disk, a file size limit) ends the run in one line, exit 1, and
loses nothing: the same command resumes bitwise once space is back. Real faults: a real tmpfs
filled up (where this machine lets us mount one: CI runs as root), and the kernel's file size limit
(RLIMIT_FSIZE, set on the running process; always available)."""

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time

import jax
import pytest

from test_checkpoint import (XL, _assert_bitwise_equal, _cli, _config, _finish, _init,  # noqa: F401
                             _logged_steps, _restore, _steps, text)

NUM_STEPS, EVERY = 40, 5
ONE_LINE = re.compile(r"^error: (.+) writing (\S+): (?:the last complete checkpoint is step (\d+)|"
                      r"there is no complete checkpoint yet)$", re.M)


def _overrides(family):
  return {"train.num_steps": NUM_STEPS, "train.checkpoint_every": EVERY, "train.log_every": 1,
          "train.eval_every": 0, "train.keep_checkpoints": 0, **(XL if family == "xl" else {})}


@pytest.fixture(scope="module")
def references(tmp_path_factory, text):
  """{family: final state of an uninterrupted run}, computed when first asked for."""
  cache = {}

  def get(family):
    if family not in cache:
      workdir = str(tmp_path_factory.mktemp(f"reference_{family}") / "run")
      status, out = _finish(_cli(workdir, text, **_overrides(family)), workdir)
      assert status == 0, out
      cache[family] = jax.device_get(_restore(workdir, _target(text, family), NUM_STEPS))
    return cache[family]

  return get


def _target(text, family):
  config = _config(text)
  if family == "xl":
    config.model.update({key.split(".")[1]: value for key, value in XL.items()})
  return _init(config, abstract=True)


def _pause_after(proc, workdir, step, timeout=180):
  """SIGSTOPs proc once metrics.jsonl shows `step` (and a checkpoint is complete)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, f"the run ended before step {step}: {_finish(proc, workdir)}"
    if max(_logged_steps(workdir), default=0) >= step and _steps(workdir):
      proc.send_signal(signal.SIGSTOP)
      return
    time.sleep(0.005)
  raise AssertionError(f"no step {step} in {workdir} after {timeout} s")


def _fails_in_one_line(proc, workdir, where):
  """The run ends within seconds of its fault: exit 1, one `error:` line naming `where` and the
  newest complete checkpoint (which is on disk), no traceback. Returns that step."""
  status, out = _finish(proc, workdir, timeout=60)
  assert status == 1, out
  assert "Traceback" not in out, out
  lines = ONE_LINE.findall(out)
  assert len(lines) == 1 and len(re.findall(r"^error:", out, re.M)) == 1, out
  _, path, step = lines[0]
  assert where in path, out
  assert step and int(step) in _steps(workdir), out
  return int(step)


def _resumes_bitwise(workdir, text, family, references, failed_at):
  logged = len(_logged_steps(workdir))
  status, out = _finish(_cli(workdir, text, **_overrides(family)), workdir)
  assert status == 0, out
  assert _logged_steps(workdir)[logged] == failed_at + 1  # From the newest complete checkpoint.
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
  final = jax.device_get(_restore(workdir, _target(text, family), NUM_STEPS))
  _assert_bitwise_equal(final, references(family))


def _mount(*args):
  subprocess.run(["mount", *args], check=True, capture_output=True)


def _can_mount(tmp_path):
  """Whether this process may mount a tmpfs (root, with CAP_SYS_ADMIN)."""
  probe = tmp_path / "probe"
  probe.mkdir()
  try:
    _mount("-t", "tmpfs", "-o", "size=1M", "tmpfs", str(probe))
  except (subprocess.CalledProcessError, FileNotFoundError):
    return False
  subprocess.run(["umount", str(probe)], check=True)
  return True


@contextlib.contextmanager
def _small_disk(tmp_path, workdir, target):
  """A 16 MB tmpfs that holds one of the run's outputs (`target`: checkpoints, metrics or
  tensorboard); the rest of workdir stays on the test's disk. Yields a function that fills it."""
  if not _can_mount(tmp_path):
    pytest.skip("cannot mount a tmpfs here (needs root); test_a_file_size_limit_... covers it")
  disk, mounts = tmp_path / "disk", []
  disk.mkdir()
  _mount("-t", "tmpfs", "-o", "size=16M", "tmpfs", str(disk))
  mounts.append(disk)
  try:
    os.makedirs(workdir)
    if target == "checkpoints":  # Orbax's directory, on the small disk.
      os.makedirs(disk / "checkpoints")
      os.makedirs(os.path.join(workdir, "checkpoints"))
      _mount("--bind", str(disk / "checkpoints"), os.path.join(workdir, "checkpoints"))
      mounts.append(os.path.join(workdir, "checkpoints"))
    elif target == "metrics":  # metrics.jsonl alone.
      for name in ("metrics.jsonl",):
        open(disk / name, "w").close()
        open(os.path.join(workdir, name), "w").close()
        _mount("--bind", str(disk / name), os.path.join(workdir, name))
        mounts.append(os.path.join(workdir, name))
    else:  # The workdir on the small disk, all but the TensorBoard events bound back to ours.
      _mount("--bind", str(disk), workdir)
      mounts.append(workdir)
      ours = tmp_path / "ours"
      os.makedirs(ours / "checkpoints")
      os.makedirs(os.path.join(workdir, "checkpoints"))
      _mount("--bind", str(ours / "checkpoints"), os.path.join(workdir, "checkpoints"))
      mounts.append(os.path.join(workdir, "checkpoints"))
      for name in ("metrics.jsonl", "config.json"):
        open(ours / name, "w").close()
        open(os.path.join(workdir, name), "w").close()
        _mount("--bind", str(ours / name), os.path.join(workdir, name))
        mounts.append(os.path.join(workdir, name))
    filler = disk / "filler"

    def fill():
      subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)

    yield fill, lambda: os.remove(filler)
  finally:
    for path in reversed(mounts):
      subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("target,family", [("checkpoints", "fixed"), ("checkpoints", "xl"),
                                           ("metrics", "fixed"), ("tensorboard", "xl")])
def test_a_full_disk_mid_run_ends_in_one_line_and_the_run_resumes_bitwise(
    tmp_path, text, references, target, family):
  workdir = str(tmp_path / "run")
  with _small_disk(tmp_path, workdir, target) as (fill, free):
    proc = _cli(workdir, text, **_overrides(family))
    _pause_after(proc, workdir, EVERY + 2)
    fill()
    proc.send_signal(signal.SIGCONT)
    where = {"checkpoints": "/checkpoints/", "metrics": "metrics.jsonl",
             "tensorboard": "events.out.tfevents"}[target]
    failed_at = _fails_in_one_line(proc, workdir, where)
    free()
    _resumes_bitwise(workdir, text, family, references, failed_at)


@pytest.mark.parametrize("family", ["fixed", "xl"])
def test_a_file_size_limit_mid_run_ends_in_one_line_and_the_run_resumes_bitwise(
    tmp_path, text, references, family):
  """RLIMIT_FSIZE set on the running process (Python ignores SIGXFSZ, so a write past it fails
  with EFBIG): below the size of a checkpoint's data file, above what the logs write."""
  workdir = str(tmp_path / "run")
  proc = _cli(workdir, text, **_overrides(family))
  _pause_after(proc, workdir, EVERY + 2)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
  proc.send_signal(signal.SIGCONT)
  failed_at = _fails_in_one_line(proc, workdir, "/checkpoints/")
  _resumes_bitwise(workdir, text, family, references, failed_at)


def test_chartx_debug_adds_the_traceback_to_the_one_line_error(tmp_path):
  args = [sys.executable, "-m", "chartx.plot", str(tmp_path / "missing")]
  plain = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, CHARTX_DEBUG=""))
  debug = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, CHARTX_DEBUG="1"))
  assert plain.returncode == debug.returncode == 1
  assert plain.stderr.startswith("error: ") and "Traceback" not in plain.stderr
  assert "Traceback" in debug.stderr and plain.stderr.strip().splitlines()[-1] in debug.stderr


@pytest.mark.parametrize("finished,status", [(True, 0), (False, -signal.SIGTERM)])
def test_a_sigterm_after_the_loop_has_finished_exits_zero(finished, status):
  code = ("import os, signal, time\n"
          "from chartx import signals\n"
          "signals.exit_quietly_when_finished()\n"
          f"if {finished}: signals._finished.set()\n"
          "os.kill(os.getpid(), signal.SIGTERM)\n"
          "time.sleep(30)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == status, proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_the_process_at_once(sig):
  """The first asks the loop to stop after a save (which may be what is stuck); the second ends
  the process there, in one line, status 1."""
  code = ("import os, signal, time\n"
          "from chartx import signals\n"
          "with signals.StopSignal(None) as stop:\n"
          f"  os.kill(os.getpid(), {int(sig)})\n"
          "  time.sleep(0.1)\n"
          "  print('stop requested:', stop(1), flush=True)\n"
          f"  os.kill(os.getpid(), {int(sig)})\n"
          "  time.sleep(30)\n"
          "print('not reached')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1, proc.stderr
  assert proc.stdout == "stop requested: True\n"
  name = signal.Signals(sig).name
  assert proc.stderr.strip().splitlines()[-1] == f"error: a second {name}: stopping at once, without saving"
