"""What a training process keeps resident: freed memory returned after compiling and when the heap
has grown by half a step's scratch block (chartx.malloc), no PyTorch imported by the TensorBoard
writer, the CPU step's memory-minimizing schedule (where it applies: test_sharding.py), and a
child process's own peak. Those about glibc's settings and imports run in a fresh process: both
are process-wide."""

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from chartx import sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> list[str]:
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


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "tensorboardX")),
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_growth_watch_releases_freed_memory_once_the_heap_has_grown_by_half_a_block():
  out = _run("""
      from chartx import malloc
      if not malloc.keep_freed_memory() or malloc.heap_end() is None:
        print("skip"); raise SystemExit
      def rss_mb():
        with open("/proc/self/status") as f:
          return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) // 1024
      watch = malloc.GrowthWatch(200 << 20)  # A 200 MB block: it acts on growth of 100 MB or more.
      print(watch.check())  # The baseline.
      small = [b"x" * (1 << 20) for _ in range(50)]  # 50 MB: below the threshold.
      print(watch.check())
      stranded = [b"x" * (1 << 20) for _ in range(150)]
      kept = b"x" * 1000  # Allocated after them: their memory cannot go back as the heap's top.
      del stranded
      before = rss_mb()
      print(watch.check(), before - rss_mb(), watch.check())
      """)
  if out == ["skip"]:
    pytest.skip("chartx.malloc's settings or sbrk are not available here")
  first, small, grown, released_mb, again = out
  assert (first, small, grown, again) == ("False", "False", "True", "False")
  assert int(released_mb) > 100  # The 150 MB freed (and held by the settings) went back.


def test_cpu_train_step_is_scheduled_for_memory(tiny_config):
  """On one CPU device (the test process has one), jit_train_step compiles with XLA's
  memory-minimizing scheduler (train.CPU_COMPILER_OPTIONS): less scratch memory than the same step
  compiled without it."""
  tiny_config.model.update(num_layers=4, d_model=64, d_ff=256)
  tiny_config.data.seq_len = tiny_config.model.max_len = 64
  task = train.make_task(tiny_config, 256)
  mesh, rules = sharding.check_config(tiny_config)
  state, shardings, _ = sharding.sharded_init(
      functools.partial(train.init_state, task, seq_len=tiny_config.data.seq_len), mesh, rules)
  assert train.memory_scheduled(mesh)
  windows_BxS = np.zeros((8, 64 + task.model_cfg.num_targets), np.int32)
  args = (state, windows_BxS, jax.random.key(0), np.zeros(8, bool))
  scratch = lambda step: step.lower(*args).compile().memory_analysis().temp_size_in_bytes
  plain = sharding.MeshJit(functools.partial(train.train_step, task), mesh, rules, donate_argnums=0)
  assert scratch(train.jit_train_step(task, mesh, shardings, rules)) < scratch(plain)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_peak_rss_of_a_child_process_is_its_own():
  """malloc.peak_rss_bytes in a small process started by a large one (this test process, holding
  400 MB more): the child's own peak, not the parent's, which getrusage's ru_maxrss inherits."""
  from chartx import malloc
  ballast = np.ones((400 << 20) // 8)  # Every page written.
  (child,) = _run("from chartx import malloc; print(malloc.peak_rss_bytes())")
  assert malloc.peak_rss_bytes() > ballast.nbytes > 4 * int(child)
