"""Inference: a checkpoint's parameters restored onto a mesh, with the model that uses them, built
once as evaluation and sampling run it (restore(): where evaluation, sampling and notebooks start)."""

import dataclasses
from typing import Any

import jax
import ml_collections

from chartx import checkpoint, sharding
from chartx.families import base, registry
from chartx.errors import UserError


@dataclasses.dataclass(frozen=True)
class Restored:
  """A model restored from a workdir for evaluation or sampling."""
  model: Any  # The family's module as inference runs it (inference_model), deterministic.
  params: Any
  step: int
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  family: base.Family
  protocol: base.Protocol  # The family's evaluation protocol, eval.* resolved.


def inference_model(model: Any, proto: base.Protocol) -> Any:
  """The family's module as evaluation and sampling run it, deterministic: its config as `proto`
  has it (Transformer-XL: eval.mem_len, eval.clamp_len, eval.same_length; the same parameters
  serve any)."""
  return registry.build(proto.inference_cfg(model.cfg))


def checkpoint_step(config: ml_collections.ConfigDict) -> int | str | None:
  """What eval.step and eval.best select, as checkpoint.restore_params takes it."""
  step, best = config.eval.step, config.eval.best
  if step < -1:
    raise UserError(f"config.eval.step must be a checkpoint step or -1 (the newest), got {step}")
  if best and step != -1:
    raise UserError(f"config.eval.step={step} and config.eval.best=True both choose a checkpoint; "
                    "set one of them")
  return "best" if best else None if step == -1 else step


def restore(config: ml_collections.ConfigDict, workdir: str, vocab_size: int) -> Restored:
  """The parameters of the checkpoint that eval.step/eval.best choose, sharded as in training.

  Only the parameters are read (not the optimizer state), onto the shapes and shardings that
  sharding.sharded_init gives, so nothing is initialized and the mesh may differ from training's.
  """
  step = checkpoint_step(config)
  family = registry.get(config.model.family)
  proto = family.protocol(config)
  model = family.build(proto.inference_cfg(registry.model_config(config, vocab_size)))
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_rules(config)
  params_like, _, _ = sharding.sharded_init(
      lambda rng: family.init_params(model, rng, config.data.seq_len), mesh, rules)
  try:
    params, step = checkpoint.restore_params(workdir, params_like, step)
  except UserError as e:
    if step is None:
      raise
    key = "config.eval.best=True" if step == "best" else f"config.eval.step={step}"
    raise UserError(f"{key}: {e}") from None
  return Restored(model=model, params=params, step=step, mesh=mesh, rules=rules, family=family,
                  protocol=proto)
