"""Optax optimizers and learning-rate schedules from the config."""

from typing import Any

import jax
import ml_collections
import optax

from chartx.errors import UserError

SCHEDULES = ("constant", "rsqrt", "cosine")
OPTIMIZERS = ("momentum", "adamw")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The optimizer section's owner: every optimizer.* key, UserError naming a bad one."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise UserError(f"config.optimizer.name must be one of {', '.join(OPTIMIZERS)}; got {opt.name!r}")
  if opt.schedule not in SCHEDULES:
    raise UserError(f"config.optimizer.schedule must be one of {', '.join(SCHEDULES)}; "
                    f"got {opt.schedule!r}")
  if not opt.learning_rate > 0:  # Written with `not` so that NaN fails too.
    raise UserError(f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate}")
  for key in ("warmup_steps", "grad_clip", "weight_decay"):
    if not opt[key] >= 0:
      raise UserError(f"config.optimizer.{key} must be >= 0, got {opt[key]}")
  for key in ("momentum", "b2"):
    if not 0 <= opt[key] < 1:
      raise UserError(f"config.optimizer.{key} must be in [0, 1), got {opt[key]}")


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up over warmup_steps to learning_rate, then the named decay."""
  lr, warmup = opt.learning_rate, int(opt.warmup_steps)
  if opt.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif opt.schedule == "rsqrt":
    # lr * sqrt(w / (w + t)): continuous at the end of warm-up, then ~1/sqrt(step).
    offset = max(warmup, 1)
    decay = lambda count: lr * (offset / (offset + count)) ** 0.5
  else:
    decay = optax.cosine_decay_schedule(lr, decay_steps=max(num_steps - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


# Parameters named so are vectors or lookup tables, which adamw's weight decay leaves alone:
# LayerNorm scales and biases, the heads' norms and biases, XL's u and v, the input embedding and
# positional tables. Every other parameter is a projection matrix and is decayed (nanoGPT's and
# MaxText's rule); the families name their parameters to fit it.
_NOT_DECAYED_SUFFIXES = ("bias", "scale", "embedding")


def decayed(params: Any) -> Any:
  """A tree like params (boxed or not) of bools: True for the matrices weight decay applies to."""
  def is_matrix(path, _):
    name = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)][-1]
    return not name.endswith(_NOT_DECAYED_SUFFIXES)
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  check_config(config)
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, config.train.num_steps)
  if opt.name == "momentum":
    core = optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov)
  else:
    core = optax.adamw(schedule, b1=opt.momentum, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=decayed)
  if opt.grad_clip:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), core)
  return core
