"""Orbax checkpoints of the train state in WORKDIR/checkpoints: save, restore, resume."""

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                         enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts an asynchronous save; manager.wait_until_finished() blocks until it is on disk."""
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(manager: ocp.CheckpointManager, state_like: Any, step: int | None = None) -> Any:
  """Restores `step` (default: newest) with the shardings and dtypes of state_like's arrays."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
