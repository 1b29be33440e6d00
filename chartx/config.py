"""The run config: each section has one owner that checks all of its keys; check() runs them all,
first thing in every mode, so a bad key of any section fails before data is read or code compiled.
"""

from typing import Any

import jax
import ml_collections

from chartx import aot, data, evaluate, losses, optimizer, sample, sharding, train, wandb_writer
from chartx.families import registry


def check(config: ml_collections.ConfigDict, devices: list[Any] | None = None,
          platform: str | None = None) -> tuple[jax.sharding.Mesh, sharding.Rules]:
  """UserError naming the first bad key of any section; else the run's mesh and logical rules.
  (checkpoint.* needs no check beyond the types ml_collections holds each key to.)
  devices, platform: the run's, by default this host's (--mode=compile: a TPU slice's)."""
  vocab = data.check_config(config)  # data.*; the paths where they are read (load_corpus).
  train.check_config(config)  # seed, train.*
  registry.model_config(config, vocab.size, platform)  # model.*
  losses.LossConfig.from_config(config)  # loss.*
  optimizer.check_config(config)  # optimizer.*
  aot.check_config(config)  # compile.*
  mesh, rules = sharding.check_config(config, devices)  # mesh.*
  evaluate.check_config(config, mesh)  # eval.*
  sample.check_config(config, vocab)  # sample.*
  wandb_writer.check_config(config)  # log.*
  return mesh, rules
