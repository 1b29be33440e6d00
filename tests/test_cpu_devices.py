"""chartx.cpu_devices: how many CPU devices a run asks for, and that the entry points get them."""

import json
import os
import subprocess
import sys

import pytest

from chartx import cpu_devices
from configs import tiny
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("train_batch, eval_batch, cores, mode, expected", [
    (16, 32, 2, "train", 2),
    (16, 32, 8, "eval", 8),
    (16, 24, 8, "train", 8),
    (12, 32, 8, "train", 4),  # The most devices that divide both batch sizes.
    (9, 32, 2, "train", 1),
    (16, 32, 4, "sample", 1),  # Sampling decodes one row.
])
def test_auto_count_divides_the_batch_sizes(tiny_config, train_batch, eval_batch, cores, mode, expected):
  tiny_config.train.batch_size, tiny_config.eval.batch_size = train_batch, eval_batch
  assert cpu_devices.device_count(tiny_config, mode, cores) == expected


def test_a_custom_mesh_or_an_explicit_count_is_not_second_guessed(tiny_config):
  tiny_config.mesh.shape = (-1, 2, 1)
  assert cpu_devices.device_count(tiny_config, "train", 8) == 1
  tiny_config.mesh.cpu_devices = 3
  assert cpu_devices.device_count(tiny_config, "train", 8) == 3
  tiny_config.mesh.cpu_devices = -1
  with pytest.raises(UserError, match=r"^config.mesh.cpu_devices must be >= 0"):
    cpu_devices.device_count(tiny_config, "train", 8)


def _devices_after_split(env_update: dict[str, str], mode: str = "train") -> list[int]:
  code = ("import json; from configs import tiny; from chartx import cpu_devices; "
          f"n = cpu_devices.split_cores(tiny.get_config(), {mode!r}); import jax; "
          "print(json.dumps([n, jax.device_count()]))")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", **env_update)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout
  return json.loads(out.splitlines()[-1])


def test_split_cores_sets_the_count_before_jax_starts():
  # taskset-like affinity is what usable_cores reads; tiny's batch sizes (8, 8) allow up to 8.
  expected = cpu_devices.device_count(tiny.get_config(), "train", cpu_devices.usable_cores())
  assert _devices_after_split({}) == [expected, expected]
  assert _devices_after_split({}, mode="sample") == [1, 1]


def test_libtpu_without_a_tpu_is_a_cpu_host():
  """chartx[tpu] installed here (no TPU chip): the CPU is still split, and JAX is not left to try
  libtpu as a backend, which logs errors before it falls back."""
  from chartx import malloc  # pylint: disable=import-outside-toplevel
  if malloc.tpu_chips():
    pytest.skip("this host has a TPU")
  code = ("from configs import tiny; from chartx import cpu_devices; import jax; "
          "n = cpu_devices.split_cores(tiny.get_config(), 'train'); print(n, jax.default_backend())")
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS")}
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True)
  expected = cpu_devices.device_count(tiny.get_config(), "train", cpu_devices.usable_cores())
  assert run.stdout.split() == [str(expected), "cpu"]
  assert "E0000" not in run.stderr


def test_xla_flags_win():
  flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
  assert _devices_after_split(flags) == [0, 3]
