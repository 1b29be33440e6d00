"""One XLA CPU device per core on a CPU-only host, set by the entry points before JAX starts.

XLA:CPU runs one device's program with a thread pool for its large matmuls, but most of a train
step's other work (fusions of elementwise ops, layer norms, softmaxes, the loss) runs on one
thread. Split into one device per core, with the batch split over them by the mesh's data axis
(plain data parallelism, gradients summed in memory), every core runs its own share of all of
it: on 2 cores configs/bench_cpu.py's step took about 10% less time (docs/results.md).

config.mesh.cpu_devices chooses the count: 0 (auto) takes the most devices, up to the cores this
process may run on, that divide train.batch_size and eval.batch_size, and only with the default
mesh.shape (-1, 1, 1) and in train and eval modes (sampling decodes one row: one device). A
positive value is used as it is. Nothing changes where JAX has an accelerator, where JAX runs
several processes, or where XLA_FLAGS or JAX_NUM_CPU_DEVICES already set the count. Where libtpu
is installed on a host without a TPU (chartx[tpu]), JAX is told to use the CPU (JAX_PLATFORMS
unset) rather than to try the TPU backend first.
"""

import os

import ml_collections

from chartx import malloc
from chartx.errors import UserError

_DEFAULT_MESH = (-1, 1, 1)


def usable_cores() -> int:
  """Cores this process may run on (taskset, cgroups' cpusets), not all of the machine's."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_count(config: ml_collections.ConfigDict, mode: str, cores: int) -> int:
  """The CPU device count config.mesh.cpu_devices asks for, in `mode` (train, eval, sample)."""
  if config.mesh.cpu_devices < 0:
    raise UserError(f"config.mesh.cpu_devices must be >= 0 (0: auto), got {config.mesh.cpu_devices}")
  if config.mesh.cpu_devices:
    return config.mesh.cpu_devices
  if mode == "sample" or tuple(config.mesh.shape) != _DEFAULT_MESH:
    return 1
  return max(k for k in range(1, cores + 1)
             if config.train.batch_size % k == 0 and config.eval.batch_size % k == 0)


def split_cores(config: ml_collections.ConfigDict, mode: str, *, multi_process: bool = False) -> int:
  """Sets JAX's CPU device count from the config (before JAX's backend starts); returns the
  count set, or 0 where it left JAX's own (see the module docstring)."""
  already = ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
             or "JAX_NUM_CPU_DEVICES" in os.environ)
  if not malloc.cpu_only():
    return 0
  import jax  # pylint: disable=import-outside-toplevel
  if not os.environ.get("JAX_PLATFORMS"):
    # libtpu installed without a TPU (chartx[tpu], for --mode=compile, which loads it itself): JAX
    # would start it as a backend, which logs errors before JAX falls back to the CPU.
    jax.config.update("jax_platforms", "cpu")
  if multi_process or already:
    return 0
  count = device_count(config, mode, usable_cores())
  jax.config.update("jax_num_cpu_devices", count)
  return count
