"""The run config: each section has one owner, which checks all of its keys; check() runs them all.

  seed, train.*   chartx.train.check_config
  data.*          chartx.data.check_config (the paths where they are read: chartx.data.load_corpus)
  model.*         chartx.model.ModelConfig.from_config
  loss.*          chartx.losses.LossConfig.from_config
  optimizer.*     chartx.optimizer.check_config
  checkpoint.*    chartx.resume.Checkpoints (ml_collections holds each to its type; nothing more)
  mesh.*          chartx.sharding.check_config
  eval.*          chartx.evaluate.check_config
  sample.*        chartx.sample.check_config

The command line calls check() at start-up in every mode, before any data is read or anything
compiled, so a bad key of any section fails in the first second: a new model family adds its
section and its owner's line here.
"""

import jax
import ml_collections

from chartx import data, evaluate, losses, optimizer, sample, sharding, train
from chartx import model as model_lib


def check(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, sharding.Rules]:
  """UserError naming the first bad key of any section; else the run's mesh and logical rules."""
  vocab = data.check_config(config)
  train.check_config(config)
  model_lib.ModelConfig.from_config(config, vocab.size)
  losses.LossConfig.from_config(config)
  optimizer.check_config(config)
  mesh, rules = sharding.check_config(config)
  evaluate.check_config(config, mesh)
  sample.check_config(config, vocab)
  return mesh, rules
