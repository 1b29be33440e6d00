"""The model families by name (config.model.family): the built-in ones, and any that a module
registers (register(family)); get(name) looks one up. Above the families: the one module that
names them."""

import dataclasses

import flax.linen as nn
import ml_collections

from chartx.errors import UserError
from chartx.families import base, fixed, xl
from chartx.families.layers import ModelConfig

_FAMILIES: dict[str, base.Family] = {}


def register(family: base.Family) -> base.Family:
  """Makes `family` the one of config.model.family=family.name (a later one of that name replaces it)."""
  _FAMILIES[family.name] = family
  return family


for _family in (fixed.FAMILY, xl.FAMILY):
  register(_family)


def names() -> tuple[str, ...]:
  return tuple(_FAMILIES)


def get(name: str) -> base.Family:
  """The family registered as `name`; UserError naming config.model.family if none is."""
  if name not in _FAMILIES:
    raise UserError(f"config.model.family must be one of {', '.join(_FAMILIES)}; got {name!r}")
  return _FAMILIES[name]


def model_config(config: ml_collections.ConfigDict, vocab_size: int,
                 platform: str | None = None) -> ModelConfig:
  """The model section's owner: the family's own model.* keys, then those every family shares
  (UserError naming a bad one), and the ModelConfig its modules read. platform: the one it will
  run on (ModelConfig.from_config)."""
  family = get(config.model.family)
  family.check_config(config)
  cfg = ModelConfig.from_config(config, vocab_size, platform)
  return dataclasses.replace(cfg, attention=family.attention(cfg.attention))


def build(cfg: ModelConfig, deterministic: bool = True, all_layers: bool = False) -> nn.Module:
  """The module of cfg.family."""
  return get(cfg.family).build(cfg, deterministic=deterministic, all_layers=all_layers)
