"""What a training process keeps resident: freed memory returned after compiling (chartx.malloc),
and no PyTorch imported by the TensorBoard writer. Each runs in a fresh process: glibc's settings
and the imported modules are process-wide."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> str:
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_memory_stays_resident_until_released():
  applied, held, released = _run("""
      from chartx import malloc
      applied = malloc.keep_freed_memory()
      def rss_mb():
        with open("/proc/self/status") as f:
          return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) // 1024
      blocks = [b"x" * (1 << 20) for _ in range(300)]  # 300 MB, every page touched.
      full = rss_mb()
      del blocks
      held = rss_mb()
      assert malloc.release_freed_memory() == applied
      print(applied, full - held, full - rss_mb())
      """)
  if applied != "True":
    pytest.skip("chartx.malloc's settings do not apply here (not glibc, or GLIBC_TUNABLES set)")
  # The settings keep the freed 300 MB resident; released, at least 250 MB of it goes back.
  assert int(held) < 50 and int(released) > 250


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("tensorboardX") is None,
                    reason="needs torch and tensorboardX installed")
def test_metrics_writer_does_not_import_torch_but_torch_still_imports():
  before, after = _run("""
      import sys
      from chartx import metrics
      print("torch" in sys.modules)
      import torch
      print(torch.ones(2).sum().item() == 2.0)
      """)
  assert (before, after) == ("False", "True")

