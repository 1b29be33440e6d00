"""The model families by name (config.model.family): the built-in ones, and any that a module
registers (register(family)); get(name) looks one up. The one module that names the families."""

import flax.linen as nn

from chartx.errors import UserError
from chartx.families import fixed, xl
from chartx.families.layers import ModelConfig

FAMILIES = ("fixed", "xl")


def build(cfg: ModelConfig, deterministic: bool = True, all_layers: bool = False) -> nn.Module:
  """The module of cfg.family: fixed.Transformer for "fixed", xl.XLTransformer for "xl"."""
  if cfg.family == "xl":
    return xl.XLTransformer(cfg, deterministic=deterministic, all_layers=all_layers)
  return fixed.Transformer(cfg, deterministic=deterministic, all_layers=all_layers)
