"""The train state and the pure train step: TrainState, Task, init_state, train_step, jit_train_step."""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from chartx import losses, profiling, sharding
from chartx import model as model_lib
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


@dataclasses.dataclass(frozen=True)
class Task:
  """The static pieces of a run that the jitted functions close over."""
  model: model_lib.Transformer
  loss_cfg: losses.LossConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  grad_accum_steps: int = 1  # Micro-batches per update (train.grad_accum_steps).

  @property
  def model_cfg(self) -> model_lib.ModelConfig:
    return self.model.cfg


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


def make_task(config: ml_collections.ConfigDict, vocab_size: int) -> Task:
  model_cfg = model_lib.ModelConfig.from_config(config, vocab_size)
  return Task(model=model_lib.Transformer(model_cfg, deterministic=False, all_layers=True),
              loss_cfg=losses.LossConfig.from_config(config),
              tx=optimizer_lib.make_optimizer(config),
              schedule=optimizer_lib.learning_rate_schedule(config.optimizer, config.train.num_steps),
              grad_accum_steps=config.train.grad_accum_steps)


def init_state(task: Task, rng: jax.Array, seq_len: int) -> TrainState:
  """A fresh state; its params are nn.Partitioned-boxed with logical axis names."""
  tokens_1xT = jnp.zeros((1, seq_len), jnp.int32)
  params = task.model.clone(deterministic=True, all_layers=False).init(rng, tokens_1xT)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=task.tx.init(params),
                    loss_weights=losses.loss_weights(jnp.zeros((), jnp.int32), task.loss_cfg))


def loss_and_grads(task: Task, params: Any, windows_BxS: jax.Array, weights_LxK: jax.Array,
                   dropout_rng: jax.Array) -> tuple[tuple[jax.Array, jax.Array], Any]:
  """((loss, nll_LxK), grads) of the batch, as task.grad_accum_steps = A micro-batches of B / A
  rows, one after another (lax.scan): only one micro-batch's activations are alive at a time.

  The loss and its parts are means over the batch, so the mean over equal micro-batches is the
  whole batch's (up to float rounding; dropout draws other masks). Micro-batch a is rows a, a + A,
  ...: each device's rows are spread over all micro-batches, so each stays split over the devices.
  """
  def grads_of(windows_MxS, rng):
    grad_fn = jax.value_and_grad(losses.compute_loss, argnums=2, has_aux=True)
    return grad_fn(task.model, task.loss_cfg, params, windows_MxS, weights_LxK, rng)

  accum = task.grad_accum_steps
  if accum == 1:
    return grads_of(windows_BxS, dropout_rng)
  rows, length = windows_BxS.shape
  windows_AxMxS = windows_BxS.reshape(rows // accum, accum, length).swapaxes(0, 1)

  def micro(total, xs):
    windows_MxS, index = xs
    out = grads_of(windows_MxS, jax.random.fold_in(dropout_rng, index))
    return jax.tree.map(jnp.add, total, out), None

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                       jax.eval_shape(grads_of, windows_AxMxS[0], dropout_rng))
  total, _ = jax.lax.scan(micro, zeros, (windows_AxMxS, jnp.arange(accum)))
  return jax.tree.map(lambda x: x / accum, total)


def train_step(task: Task, state: TrainState, windows_BxS: jax.Array,
               rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update (of task.grad_accum_steps micro-batches: the step, the learning rate and the
  auxiliary-loss schedule count updates). Pure: the dropout key is rng folded with the step, so
  a step is reproducible."""
  dropout_rng = jax.random.fold_in(rng, state.step)
  (loss, nll_LxK), grads = loss_and_grads(task, state.params, windows_BxS, state.loss_weights,
                                          dropout_rng)
  updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  next_step = state.step + 1
  out = {"loss": loss, "bpc": losses.bits(nll_LxK[-1, 0]), "nll": nll_LxK,
         "loss_weights": state.loss_weights, "grad_norm": optax.tree.norm(grads),
         "learning_rate": task.schedule(state.step)}
  return TrainState(step=next_step, params=params, opt_state=opt_state,
                    loss_weights=losses.loss_weights(next_step, task.loss_cfg)), out


def jit_train_step(task: Task, mesh: jax.sharding.Mesh, shardings: TrainState,
                   rules: sharding.Rules) -> sharding.MeshJit:
  """The train step compiled once, with explicit shardings and the old state's buffers donated.

  It is traced under the mesh and `rules`, which the activations' sharding constraints need.
  """
  return sharding.MeshJit(
      functools.partial(train_step, task), mesh, rules,
      in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
