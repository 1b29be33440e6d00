"""The train state and the pure train step: TrainState, Task, init_state, train_step, jit_train_step."""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from chartx import losses, profiling, sharding
from chartx.families import base, layers, registry
from chartx import optimizer as optimizer_lib
from chartx.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: the step the next update will be.
  params: Any
  opt_state: Any
  # w_LxK, the auxiliary-loss weights for `step`. A pure function of the step, kept in the state
  # (and so in checkpoints) so a restored run continues the schedule and can be inspected.
  loss_weights: jax.Array
  # Transformer-XL's memory of each stream (a batch row; see data.stream_batch), carried from one
  # step to the next and checkpointed with the rest; None for the fixed family, which has none.
  memory: Any = None


@dataclasses.dataclass(frozen=True)
class Task:
  """The static pieces of a run that the jitted functions close over."""
  model: Any  # The family's module (registry.build).
  loss_cfg: losses.LossConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  grad_accum_steps: int = 1  # Micro-batches per update (train.grad_accum_steps).
  batch_size: int = 1  # The global batch (train.batch_size): the rows of a memory.

  @property
  def model_cfg(self) -> layers.ModelConfig:
    return self.model.cfg

  @property
  def family(self) -> base.Family:
    return registry.get(self.model.cfg.family)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The owner of seed and the train section: every key, UserError naming a bad one."""
  if config.seed < 0:
    raise UserError(f"config.seed must be >= 0, got {config.seed}")
  for key, low in (("num_steps", 1), ("batch_size", 1), ("log_every", 1), ("eval_every", 0),
                   ("checkpoint_every", 0), ("keep_checkpoints", 0),  # 0 turns these three off.
                   ("grad_accum_steps", 1)):
    if config.train[key] < low:
      raise UserError(f"config.train.{key} must be >= {low}, got {config.train[key]}")
  profiling.parse_steps(config.train.profile_steps)
  if config.train.batch_size % config.train.grad_accum_steps:
    raise UserError(f"config.train.grad_accum_steps={config.train.grad_accum_steps} must divide "
                    f"config.train.batch_size={config.train.batch_size} (each update's micro-batches "
                    "are equal parts of the batch)")


def make_task(config: ml_collections.ConfigDict, vocab_size: int, platform: str | None = None) -> Task:
  """platform: the one the task will run on (registry.model_config); default JAX's backend."""
  model_cfg = registry.model_config(config, vocab_size, platform)
  return Task(model=registry.build(model_cfg, deterministic=False, all_layers=True),
              loss_cfg=losses.LossConfig.from_config(config),
              tx=optimizer_lib.make_optimizer(config),
              schedule=optimizer_lib.learning_rate_schedule(config.optimizer, config.train.num_steps),
              grad_accum_steps=config.train.grad_accum_steps, batch_size=config.train.batch_size)


def init_state(task: Task, rng: jax.Array, seq_len: int) -> TrainState:
  """A fresh state; its params (and memory) are nn.Partitioned-boxed with logical axis names."""
  params = task.family.init_params(task.model, rng, seq_len)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=task.tx.init(params),
                    loss_weights=losses.loss_weights(jnp.zeros((), jnp.int32), task.loss_cfg),
                    memory=task.family.init_memory(task.model_cfg, task.batch_size))


def _batch_axes(task: Task) -> Any:
  """The memory's tree with each leaf's batch axis, from the logical axis names of
  family.init_memory (traced, not computed); None for a family without memory."""
  boxed = jax.eval_shape(lambda: task.family.init_memory(task.model_cfg, 1))
  return jax.tree.map(lambda box: box.names.index("batch"), boxed,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _micro_batches(tree: Any, accum: int, axes: Any = None) -> Any:
  """Splits the batch rows of each leaf into accum micro-batches on a new leading axis: micro-batch
  a is rows a, a + A, ... (axes: a tree like `tree` of each leaf's batch axis; None: axis 0)."""
  def split(x, axis):
    shape = x.shape[:axis] + (x.shape[axis] // accum, accum) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis + 1, 0)
  if axes is None:
    return jax.tree.map(lambda x: split(x, 0), tree)
  return jax.tree.map(split, tree, axes)


def _whole_batch(tree: Any, axes: Any) -> Any:
  """The inverse of _micro_batches for a memory: the micro-batches' rows back in batch order."""
  def merge(x, axis):
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.tree.map(merge, tree, axes)


def loss_and_grads(task: Task, params: Any, windows_BxS: jax.Array, weights_LxK: jax.Array,
                   dropout_rng: jax.Array, memory: Any = None) -> tuple[tuple[jax.Array, Any], Any]:
  """((loss, (nll_LxK, memory)), grads) of the batch, as task.grad_accum_steps = A micro-batches
  of B / A rows, one after another (lax.scan): only one micro-batch's activations are alive at a
  time. memory: the rows' memory (None for the fixed family); the new one is returned.

  The loss and its parts are means over the batch, so the mean over equal micro-batches is the
  whole batch's (up to float rounding; dropout draws other masks). Micro-batch a is rows a, a + A,
  ...: each device's rows are spread over all micro-batches, so each stays split over the devices;
  a memory's rows are split the same way, so each micro-batch carries its own streams' memory.
  """
  def grads_of(windows_MxS, memory, rng):
    grad_fn = jax.value_and_grad(losses.compute_loss, argnums=2, has_aux=True)
    return grad_fn(task.model, task.loss_cfg, params, windows_MxS, weights_LxK, rng, memory)

  accum = task.grad_accum_steps
  if accum == 1:
    return grads_of(windows_BxS, memory, dropout_rng)
  windows_AxMxS = _micro_batches(windows_BxS, accum)
  memory_axes = _batch_axes(task)
  memory_A = None if memory is None else _micro_batches(memory, accum, memory_axes)

  def micro(total, xs):
    windows_MxS, memory, index = xs
    (loss, (nll_LxK, memory)), grads = grads_of(windows_MxS, memory, jax.random.fold_in(dropout_rng, index))
    return jax.tree.map(jnp.add, total, (loss, nll_LxK, grads)), memory

  first = jax.tree.map(lambda x: x[0], (windows_AxMxS, memory_A))
  (_, (nll_LxK, _)), grads = jax.eval_shape(grads_of, *first, dropout_rng)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                       (jax.ShapeDtypeStruct((), jnp.float32), nll_LxK, grads))
  total, memory_A = jax.lax.scan(micro, zeros, (windows_AxMxS, memory_A, jnp.arange(accum)))
  loss, nll_LxK, grads = jax.tree.map(lambda x: x / accum, total)
  memory = None if memory_A is None else _whole_batch(memory_A, memory_axes)
  return (loss, (nll_LxK, memory)), grads


def train_step(task: Task, state: TrainState, windows_BxS: jax.Array, rng: jax.Array,
               reset_B: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update (of task.grad_accum_steps micro-batches: the step, the learning rate and the
  auxiliary-loss schedule count updates). Pure: the dropout key is rng folded with the step, so
  a step is reproducible. reset_B: the rows whose stream starts over here, whose memory (if the
  family has one) is emptied first (the family's train_batch gives it); None: none."""
  dropout_rng = jax.random.fold_in(rng, state.step)
  memory = state.memory
  if memory is not None and reset_B is not None:
    memory = task.family.reset_memory(memory, reset_B)
  (loss, (nll_LxK, memory)), grads = loss_and_grads(task, state.params, windows_BxS,
                                                    state.loss_weights, dropout_rng, memory)
  updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  next_step = state.step + 1
  out = {"loss": loss, "bpc": losses.bits(nll_LxK[-1, 0]), "nll": nll_LxK,
         "loss_weights": state.loss_weights, "grad_norm": optax.tree.norm(grads),
         "learning_rate": task.schedule(state.step)}
  return TrainState(step=next_step, params=params, opt_state=opt_state,
                    loss_weights=losses.loss_weights(next_step, task.loss_cfg), memory=memory), out


# XLA:CPU's memory-minimizing scheduler: configs/bench_cpu.py's step needs 753 MiB of scratch
# memory instead of 1,015 MiB, at the same step time (docs/results.md, "Peak memory of a training
# run against PyTorch's loop").
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def memory_scheduled(mesh: jax.sharding.Mesh) -> bool:
  """Whether the train step compiles with CPU_COMPILER_OPTIONS: on a CPU mesh that splits only the
  batch (one device, or data parallelism: every device holds the whole state, and the only
  collectives are the gradients' all-reduces). With the parameters split over fsdp, the scanned
  layers' all-gathers deadlocked under that scheduler (2 and 8 simulated devices on 2 cores: the
  devices waited for each other at a rendezvous; jax 0.10.2). Tensor parallelism ran in two short
  probes (docs/results.md) and stays out until it is tested as data parallelism is."""
  return (mesh.devices.flat[0].platform == "cpu"
          and mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1)


def jit_train_step(task: Task, mesh: jax.sharding.Mesh, shardings: TrainState,
                   rules: sharding.Rules) -> sharding.MeshJit:
  """The train step compiled once, with explicit shardings and the old state's buffers donated:
  step(state, windows_BxS, rng, reset_B), for every family.

  It is traced under the mesh and `rules`, which the activations' sharding constraints need.
  """
  batch = sharding.batch_sharding(mesh)
  return sharding.MeshJit(
      functools.partial(train_step, task), mesh, rules,
      in_shardings=(shardings, batch, sharding.replicated(mesh), batch),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
      compiler_options=CPU_COMPILER_OPTIONS if memory_scheduled(mesh) else None)
