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

The price is that freed memory stays resident too, however little of it is used again. Two
cases matter in training, and the loop handles both: the compilers' scratch memory, freed when
a compilation ends (the loop compiles the step before its first run and then calls
release_freed_memory, glibc's malloc_trim: 182 MiB less for configs/small.py's step), and the
holes that a step's scratch block leaves when it moves to the top of the heap (GrowthWatch).
docs/results.md, "Peak memory of a training run against PyTorch's loop", has the figures.
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


def heap_end() -> int | None:
  """Where the heap ends (the program break, sbrk(0)): under the settings above it grows only
  when glibc takes more memory from the kernel, resident or not. O(1), unlike mallinfo2(), which
  walks every free block (144 ms with 50,000 of them). None where unknown."""
  try:
    sbrk = ctypes.CDLL("libc.so.6").sbrk
  except (OSError, AttributeError):
    return None
  sbrk.restype, sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
  return sbrk(0)


def peak_rss_bytes() -> int:
  """The most resident memory this process has held (Linux: /proc/self/status's VmHWM, which
  starts afresh at exec). Not getrusage's ru_maxrss: a child process inherits its parent's there,
  so a small child started by a large process reported the parent's peak (1,511 MiB for a child
  that held 11 MiB). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
  except (OSError, StopIteration):
    import resource  # pylint: disable=import-outside-toplevel
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class GrowthWatch:
  """Releases the heap's freed memory (release_freed_memory) each time the heap has grown by half
  a block or more since the last check(): the training loop's block is a step's scratch memory.

  Under the settings above XLA:CPU's scratch block, freed at the end of each step, is reused by
  the next step only where its hole has merged with free memory beside it (the top of the heap):
  XLA allocates it 64-byte aligned (posix_memalign), for which glibc takes the size plus 96 bytes
  and gives the two ends back as small free chunks that its per-thread cache keeps and other
  allocations reuse, so a hole of the block's own size never fits the same request again. The
  step then takes a new block at the top of the heap, and the hole, touched and free, stays
  resident beside it: 1 to 4 times in 10 steps of configs/small.py, at no fixed step, with one
  device or two (whose blocks race each other). Released when it happens, a stranded hole counts
  in the peak once, not once per new block; the next step faults its scratch pages in afresh, once.
  """

  def __init__(self, block_bytes: int):
    self._threshold = block_bytes // 2
    self._last = None

  def check(self) -> bool:
    """Call between steps; the first call sets the baseline. Returns whether it released."""
    if not _applied or not self._threshold:
      return False
    now = heap_end()
    if now is None:
      return False
    grown = self._last is not None and now - self._last >= self._threshold
    self._last = now
    return grown and release_freed_memory()
