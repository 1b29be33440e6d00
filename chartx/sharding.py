"""Device mesh, logical-axis rules, the shardings of the train state and batches, and processes.

The mesh has three axes: "data" (data parallelism, parameters replicated), "fsdp" (data
parallelism whose parameters and optimizer state are sharded too, and gathered where a layer
uses them) and "tensor" (tensor parallelism inside a layer: heads, feed-forward units and the
vocabulary are split). Parameters and activations carry logical axis names (chartx.families);
config.mesh.rules maps them to mesh axes, so one config change moves a run from a laptop, mesh
(1, 1, 1), to a pod, e.g. (-1, 8, 1).

Several hosts run the same program over one global mesh (chartx.distributed starts them): each
process feeds its own rows of the global batch (process_slice, global_batch).
"""

import collections
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from chartx.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# (logical axis name, mesh axes): the first rule whose mesh axes an array has not used yet wins.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


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
  """The (data, fsdp, tensor) mesh over `devices`, by default every device of every process.

  jax.make_mesh lays TPU devices out along the physical torus and orders GPUs by id.
  The axes are Auto: the compiler propagates shardings from the ones chartx sets.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices))
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except (ValueError, NotImplementedError) as e:
    raise UserError(f"config.mesh.shape={shape} does not fit the topology of the "
                    f"{devices[0].device_kind} devices: {str(e).splitlines()[0]}") from e


def logical_rules(config: ml_collections.ConfigDict) -> Rules:
  """config.mesh.rules, checked: each a (logical name, mesh axis | tuple of them | None) pair."""
  rules = []
  for rule in config.mesh.rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise UserError(f"config.mesh.rules: {rule!r} is not a (logical axis name, mesh axes) pair")
    name, axes = rule
    axes = axes if axes is None or isinstance(axes, str) else tuple(axes)
    unknown = [a for a in _axis_tuple(axes) if a not in MESH_AXES]
    if unknown:
      raise UserError(f"config.mesh.rules: ({name!r}, {axes!r}) names mesh axis {unknown[0]!r}; "
                      f"the mesh axes are {', '.join(MESH_AXES)}")
    rules.append((name, axes))
  return tuple(rules)


def check_config(config: ml_collections.ConfigDict,
                 devices: list[Any] | None = None) -> tuple[Mesh, Rules]:
  """The mesh section's owner: (mesh, rules) from mesh.*, and train.batch_size splits over the
  mesh (over `devices`, by default every device of every process: make_mesh)."""
  mesh = make_mesh(config, devices)
  check_batch(config.train.batch_size, mesh, "config.train.batch_size")
  if config.train.grad_accum_steps > 1:  # Each micro-batch is split over the devices too.
    check_batch(config.train.batch_size // config.train.grad_accum_steps, mesh,
                "config.train.batch_size / config.train.grad_accum_steps")
  return mesh, logical_rules(config)


def _axis_tuple(axes: str | tuple[str, ...] | None) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def check_batch(batch_size: int, mesh: Mesh | AbstractMesh, key: str) -> None:
  """The global batch must split evenly over the data-parallel devices (so over the processes too)."""
  size = math.prod(mesh.shape[a] for a in BATCH_AXES)  # The data-parallel devices.
  if batch_size < 1 or batch_size % size:
    raise UserError(f"{key}={batch_size} is not a positive multiple of the {size} data-parallel "
                    f"devices (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")


def batch_sharding(mesh: Mesh | AbstractMesh) -> NamedSharding:
  """Batches split their leading axis over data and fsdp, and are replicated over tensor."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh | AbstractMesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate_key(key: jax.Array, mesh: Mesh) -> jax.Array:
  """A PRNG key, equal in every process, as one global array replicated over the mesh: the
  sharding a compiled step's key argument has (device_put cannot place it on another process's
  devices)."""
  data = jax.make_array_from_process_local_data(replicated(mesh), np.asarray(jax.random.key_data(key)))
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def logical_shardings(abstract_boxed: Any, mesh: Mesh | AbstractMesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose nn.Partitioned leaves carry logical axis names; the rest replicate.

  The result has a NamedSharding where the tree has an nn.Partitioned box, so it is also the
  sharding tree of the unboxed state. A dimension that its mesh axes do not divide (text8's 27
  symbols over tensor=2) stays whole instead of failing to compile, and a warning names it.
  """
  def one(path, leaf) -> NamedSharding:
    if not isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, PartitionSpec())
    spec = []
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, rules)
    for name, size, axes in zip(leaf.names, leaf.value.shape, mesh_axes):
      ways = math.prod(mesh.shape[a] for a in _axis_tuple(axes))
      if size % ways:
        logging.warning("%s: its %r dimension (%d) does not divide over mesh axes %s (%d ways); "
                        "kept whole", jax.tree_util.keystr(path, simple=True, separator="/"),
                        name, size, axes, ways)
        axes = None
      spec.append(axes)
    return NamedSharding(mesh, PartitionSpec(*spec))
  return jax.tree_util.tree_map_with_path(one, abstract_boxed,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


def slice_of_process(rows_of_process: Mapping[int, set[tuple[int, int]]],
                     process: int) -> tuple[int, int]:
  """(index, count) from the row blocks (start, stop) of the global batch each process's devices hold.

  Processes that hold the same blocks (a tensor axis spanning processes) get the same index.
  """
  groups = sorted({frozenset(blocks) for blocks in rows_of_process.values()}, key=min)
  blocks = [b for group in groups for b in group]
  if len(blocks) != len(set(blocks)) or len({len(group) for group in groups}) != 1:
    raise UserError("config.mesh.shape puts parts of the same batch rows on different sets of "
                    "processes; make the tensor axis divide or be divided by the devices per host")
  return groups.index(frozenset(rows_of_process[process])), len(groups)


@functools.lru_cache(maxsize=None)
def process_slice(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """(index, count): this process feeds slice `index` of `count` equal slices of the global batch.

  Pass them to data.train_batch(process_index=index, process_count=count), then the rows to
  global_batch. count is the process count when the batch axes span the processes, fewer when
  processes hold replicas. Where a process's rows are not contiguous in the global array (a TPU
  torus order), make_array_from_process_local_data places its slice in order: a batch is a
  set of windows, so the row order does not matter.
  """
  check_batch(batch_size, mesh, "the batch size")
  rows_of_process = collections.defaultdict(set)
  for device, (rows,) in batch_sharding(mesh).devices_indices_map((batch_size,)).items():
    rows_of_process[device.process_index].add((rows.start or 0, rows.stop or batch_size))
  return slice_of_process(rows_of_process, jax.process_index())


def global_batch(local_BxS: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles the global batch from this process's rows (its process_slice of the global batch)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_BxS)


def platform() -> str:
  """The platform of the code being traced: that of the devices of the mesh in context (MeshJit's;
  --mode=compile's are a TPU slice's on a CPU host), else JAX's default backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return jax.default_backend() if device is None else device.platform


class MeshJit:
  """jax.jit(fn, **jit_kwargs) (in/out shardings, donation), traced, lowered and called under its
  mesh and logical-axis rules: the one way chartx binds them.

  flax's with_logical_constraint does nothing unless both are in context when the function is
  traced, and jit's cache does not see the rules: binding them here makes the activations'
  shardings independent of where the first call happens, and the cache key the same every call.
  """

  def __init__(self, fn: Callable, mesh: Mesh, rules: Rules, **jit_kwargs: Any):
    self._jitted = jax.jit(fn, **jit_kwargs)
    self.mesh, self.rules = mesh, rules

  def __call__(self, *args: Any) -> Any:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted(*args)

  def lower(self, *args: Any) -> Any:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._jitted.lower(*args)


def sharded_init(init: Callable[[jax.Array], Any], mesh: Mesh | AbstractMesh,
                 rules: Rules) -> tuple[Any, Any, Callable[[jax.Array], Any]]:
  """(abstract, shardings, create) of the tree init(rng) builds with nn.Partitioned boxes: the one
  recipe for state never whole on one device. abstract: the unboxed tree's jax.ShapeDtypeStructs
  with their shardings (a restore target, or what a step lowers against; nothing is computed);
  create(rng): init jitted with those out_shardings, unboxed (needs a concrete mesh)."""
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  create = lambda rng: nn.unbox(MeshJit(init, mesh, rules, in_shardings=replicated(mesh),
                                        out_shardings=shardings)(rng))
  return abstract, shardings, create
