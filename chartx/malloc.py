"""glibc malloc settings for XLA:CPU, applied by the command-line entry points before JAX starts.

XLA:CPU allocates each step's scratch memory afresh (0.87 GB a step for configs/bench_cpu.py),
and glibc serves an allocation that large from fresh pages of the kernel (mmap) and returns them
when it is freed: every step then pays a page fault per 4 KiB page it touches, about a third of
the step's time on a 2-core machine. With mmap off, one arena and a high trim threshold, freed
memory stays in the process and the next step reuses it; the process's resident memory stays at
its peak. The settings must come before XLA's threads first allocate (set later, they did not
take effect), and they are process-wide, so chartx applies them only when it runs as a program
(python -m chartx.main, chartx.bench), only with glibc, only where JAX has no GPU or TPU plugin
(or JAX_PLATFORMS=cpu), and not when GLIBC_TUNABLES already sets malloc tunables.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def cpu_only() -> bool:
  """Whether JAX will run on the CPU alone (no GPU or TPU plugin installed, or JAX_PLATFORMS=cpu)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",") == ["cpu"]
  accelerators = list(importlib.metadata.entry_points(group="jax_plugins"))
  return not accelerators and importlib.util.find_spec("libtpu") is None


def keep_freed_memory() -> bool:
  """Applies the settings above where they apply; returns whether it did."""
  if not sys.platform.startswith("linux") or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
    return False
  if not cpu_only():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # Not glibc (musl has no mallopt).
    return False
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
