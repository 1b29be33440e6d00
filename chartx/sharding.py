"""Device mesh, logical-axis rules and the shardings of the train state and batches.

The mesh has three axes: "data" (pure data parallelism), "fsdp" (data parallelism whose
parameters and optimizer state are sharded too) and "tensor" (tensor parallelism inside a
layer). Parameters carry logical axis names (chartx.model); config.mesh.rules maps them to
mesh axes, so one config change moves a run from a laptop to a pod.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chartx.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """config.mesh.shape with its -1 (at most one) filled from the device count."""
  shape = [int(s) for s in config.mesh.shape]
  if len(shape) != len(MESH_AXES):
    raise UserError(f"config.mesh.shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {tuple(shape)}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f"config.mesh.shape={tuple(shape)}: entries must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f"config.mesh.shape={tuple(shape)} does not divide the {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise UserError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                    f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.mesh.rules)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, key: str) -> None:
  """The global batch must split evenly over the data-parallel devices and the processes."""
  size = data_parallel_size(mesh)
  if batch_size % size:
    raise UserError(f"{key}={batch_size} is not divisible by the {size} data-parallel devices "
                    f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if batch_size % jax.process_count():
    raise UserError(f"{key}={batch_size} is not divisible by the {jax.process_count()} processes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split their leading axis over data and fsdp, and are replicated over tensor."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: tuple) -> Any:
  """NamedShardings for a (possibly nn.Partitioned-boxed) abstract tree; unboxed leaves replicate."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def global_batch(local_BxS: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles the global batch from this process's rows (its slice of the global batch)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_BxS)
