"""glibc malloc settings for XLA:CPU, applied by the command-line entry points before JAX starts.

XLA:CPU allocates each step's scratch memory afresh (0.87 GB a step for configs/bench_cpu.py),
and glibc serves an allocation that large from fresh pages of the kernel (mmap) and returns them
when it is freed: every step then pays a page fault per 4 KiB page it touches, about a third of
the step's time on a 2-core machine. With mmap off, one arena and a high trim threshold, freed
memory stays in the process and the next step reuses it; the process's resident memory stays at
its peak. The settings must come before XLA's threads first allocate (set later, they did not
take effect), and they are process-wide, so chartx applies them only when it runs as a program
(python -m chartx.main, chartx.bench), only with glibc, only where JAX has no GPU plugin and no TPU
(or JAX_PLATFORMS=cpu), and not when GLIBC_TUNABLES already sets malloc tunables. libtpu installed
on a host without a TPU chip (chartx[tpu], for --mode=compile) still counts as CPU-only.

The price is that memory freed once stays resident too: the compilers' scratch memory, freed
when a compilation ends, would count in the process's peak beside every step's. The training
loop compiles its steps before the first one runs and then calls release_freed_memory(), which
returns the pages of every free block to the kernel once (malloc_trim): about 180 MB less peak
resident memory for configs/small.py (docs/results.md, "Peak memory of a training run").
"""

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# PCI ids of TPU chips (jax/_src/hardware_utils.py's list: v3, v4, v5p, v5e, v6e, TPU7x and one
# unnamed); an unknown future chip counts as no TPU, which only costs these CPU settings there.
_GOOGLE_VENDOR = "0x1ae0"
_TPU_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_applied = False  # Whether keep_freed_memory() applied the settings in this process.


def cpu_only() -> bool:
  """Whether JAX will run on the CPU alone (no GPU plugin installed, no TPU: JAX_PLATFORMS=cpu
  says so too)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",") == ["cpu"]
  accelerators = list(importlib.metadata.entry_points(group="jax_plugins"))
  return not accelerators and (importlib.util.find_spec("libtpu") is None or not tpu_chips())


def tpu_chips() -> int:
  """TPU chips on this host's PCI bus, found as JAX finds them before it starts libtpu: Google's
  vendor id and a TPU's device id (other Google devices, such as the gVNIC network card of a
  CPU-only cloud VM, are no TPU). libtpu alone, installed on a CPU host, is no TPU."""
  count = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    device = os.path.join(os.path.dirname(vendor), "device")
    try:
      with open(vendor, encoding="ascii") as v, open(device, encoding="ascii") as d:
        count += v.read().strip() == _GOOGLE_VENDOR and d.read().strip() in _TPU_DEVICES
    except OSError:
      continue
  return count


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
  global _applied
  _applied = all(mallopt(param, value) == 1 for param, value in
                 ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
  return _applied


def release_freed_memory() -> bool:
  """Where keep_freed_memory() applied its settings: returns the whole free pages of the heap to
  the kernel (glibc's malloc_trim(0)); the next allocations that reuse them fault them in again,
  once. Returns whether it did; elsewhere freed memory is not held, and it does nothing."""
  if not _applied:
    return False
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  return True

