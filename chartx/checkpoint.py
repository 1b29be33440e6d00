"""Orbax checkpoints of the train state in WORKDIR/checkpoints: the manager, save, restore, diagnostics.

WORKDIR/checkpoints/<step>/ holds one TrainState (step, params, opt_state, loss_weights, and
Transformer-XL's memory: None for the fixed family). Batches are a pure function of (seed, step)
and dropout keys are fold_in(rng, step), so that state is all a run needs to continue bit for
bit. Orbax writes a save into <step>.orbax-checkpoint-tmp/ and
renames it to <step>/ once complete, so a crash in the middle of a save leaves only the former.

Training (chartx.resume.Checkpoints) keeps the newest config.train.keep_checkpoints and the one with
the lowest validation bpc; inference reads parameters with restore_params, which writes nothing.
"""

import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from chartx import errors
from chartx.errors import UserError

# The metric that ranks checkpoints for keep-best; lower is better. Saved with a checkpoint
# taken at an eval step of the validation split.
BEST_METRIC = "validation_bpc"


def checkpoint_dir(workdir: str) -> epath.Path:
  path = workdir if "://" in workdir else os.path.abspath(workdir)  # gs:// stays as it is.
  return epath.Path(path) / "checkpoints"


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None) -> ocp.CheckpointManager:
  """A CheckpointManager on WORKDIR/checkpoints; it writes nothing until save is called.

  With a config (training), saves are asynchronous, and each save removes the checkpoints that are
  neither among the newest config.train.keep_checkpoints (0: all) nor the best by validation bpc.
  Raises UserError if the workdir is a file or cannot be read.
  """
  directory = checked_directory(workdir)
  if config is None:
    options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0,
                                           best_fn=_bpc, best_mode="min")
  else:
    policies = ocp.checkpoint_managers
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(n=config.train.keep_checkpoints or None),
        # reverse=True sorts by descending bpc, and BestN keeps the last n: the lowest.
        policies.BestN(get_metric_fn=_bpc, reverse=True, n=1,
                       keep_checkpoints_without_metrics=False)])
    # best_fn only makes Orbax write each checkpoint's metrics; `keep` decides what stays.
    options = ocp.CheckpointManagerOptions(preservation_policy=keep, best_fn=_bpc, best_mode="min",
                                           enable_async_checkpointing=True)
  try:
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers=ocp.PyTreeCheckpointHandler())
  except OSError as e:
    raise UserError(f"cannot use {directory} for checkpoints: {e}") from e


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: Mapping[str, Any] | None = None,
         config: ml_collections.ConfigDict | None = None) -> None:
  """Starts an asynchronous save of `state` as checkpoint `step`; manager.wait_until_finished() waits.

  metrics: the loop's validation results at `step`, if any; their validation_bpc ranks the
  checkpoint for keep-best. config: the run's, kept in the checkpoint's metadata (saved_config).
  Raises UserError instead of saving a state that holds a NaN or Inf.
  """
  if not bool(_all_finite(state)):
    raise UserError(f"the train state after step {step} holds NaN or Inf values, so it is not "
                    f"saved; {describe_newest(manager)}")
  kept = {BEST_METRIC: float(metrics[BEST_METRIC])} if metrics and BEST_METRIC in metrics else {}
  manager.save(step, args=ocp.args.PyTreeSave(state), metrics=kept, force=True,
               custom_metadata={"config": config.to_dict()} if config is not None else None)


def saved_config(workdir: str) -> dict[str, Any] | None:
  """The config kept in the metadata of WORKDIR's newest checkpoint that has one, as a dict."""
  manager = make_manager(workdir)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        values = (manager.metadata(step).custom_metadata or {}).get("config")
      except Exception:  # pylint: disable=broad-except  (a damaged checkpoint: try an older one)
        continue
      if values is not None:
        return values
    return None
  finally:
    manager.close()


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None, *,
            params_only: bool = False) -> Any:
  """Checkpoint `step` (default: the newest) onto target, a state (or its params if params_only).

  target's leaves are arrays or jax.ShapeDtypeStruct, whose shapes, dtypes and shardings the
  restored ones take; the mesh may differ from the saving run's. Raises UserError if the
  checkpoint's shapes differ from target's; any other exception means it cannot be read.
  """
  step = manager.latest_step() if step is None else step
  item = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": target} if params_only else target)
  saved = manager.item_metadata(step).tree
  if params_only:
    saved = {"params": saved.get("params", {})}
  mismatch = _shape_mismatch(saved, item)
  if mismatch:
    raise UserError(f"{manager.directory / str(step)} does not fit this config: {mismatch}")
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=params_only or _lacks_unused_fields(saved, item)))
  return restored["params"] if params_only else restored


def restore_params(workdir: str, params_like: Any, step: int | str | None = None) -> tuple[Any, int]:
  """(params, step) from WORKDIR/checkpoints, for evaluation, sampling and fine-tuning.

  params_like: the model's parameters (arrays or jax.ShapeDtypeStruct), whose shapes and shardings
  the restored ones take, on any mesh. step: None for the newest readable checkpoint (newer ones
  that cannot be read are skipped with a warning), an int for that step, "best" for the lowest
  validation bpc. Writes nothing. Raises UserError if there is no such checkpoint, it cannot be
  read, or its shapes differ from params_like's.
  """
  manager = make_manager(workdir)
  try:
    steps = manager.all_steps()
    if not steps:
      raise UserError(f"no checkpoint in {manager.directory}: train first (--mode=train) "
                      "or pass the workdir of a trained run")
    if step is None:
      candidates = sorted(steps, reverse=True)
    elif step == "best":
      best = best_checkpoint(manager)
      if best is None:
        raise UserError(f"no checkpoint in {manager.directory} has a {BEST_METRIC} (checkpoints "
                        "taken at eval steps of the validation split have one)")
      candidates = [best[0]]
    elif step in steps:
      candidates = [step]
    else:
      raise UserError(f"no checkpoint {step} in {manager.directory} "
                      f"(steps: {', '.join(map(str, sorted(steps)))})")
    params, found, failures = read_newest(manager, candidates, params_like, params_only=True)
    if found is None:
      raise UserError(unreadable_message(manager, failures))
    warn_unreadable(manager, failures, "skipping")
    return params, found
  finally:
    manager.close()


def checked_directory(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints, after checking that it and the workdir can be used."""
  directory = checkpoint_dir(workdir)
  _check_directory(directory.parent, "--workdir")
  _check_directory(directory, "the checkpoint directory")
  return directory


def _check_directory(path: epath.Path, what: str) -> None:
  """UserError unless `path` is missing (it will be created) or a directory that can be listed."""
  try:
    if not path.exists():
      return
    if not path.is_dir():
      raise UserError(f"{what} {path} is a file, not a directory")
    next(iter(path.iterdir()), None)
  except OSError as e:
    raise UserError(f"{what} {path} cannot be read: {e.strerror or e}") from e


def _bpc(metrics: Mapping[str, Any]) -> float:
  """A checkpoint's rank for keep-best; one saved outside an eval step ranks last."""
  return metrics.get(BEST_METRIC, math.inf)


def best_checkpoint(manager: ocp.CheckpointManager) -> tuple[int, float] | None:
  """(step, validation bpc) of the checkpoint with the lowest one, if any has one."""
  scored = [(metrics[BEST_METRIC], step) for step in manager.all_steps()
            if (metrics := manager.metrics(step)) and BEST_METRIC in metrics]
  if not scored:
    return None
  bpc, step = min(scored)
  return step, bpc


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves))


def describe_newest(manager: ocp.CheckpointManager) -> str:
  step = manager.latest_step()
  if step is None:
    return f"no checkpoint is in {manager.directory}"
  return f"the newest checkpoint, {manager.directory / str(step)}, is intact"


def read_newest(manager: ocp.CheckpointManager, steps: list[int], target: Any, *,
                 params_only: bool) -> tuple[Any, int | None, list[tuple[int, Exception]]]:
  """(restored, step, failures): the first of `steps` that reads, and those before it that did not."""
  failures = []
  errors.drop_closed_loop_reports()  # Before reading: the reports of a failed read come late.
  for step in steps:
    try:
      return restore(manager, target, step, params_only=params_only), step, failures
    except UserError:
      raise
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged checkpoint.
      failures.append((step, e))
  return None, None, failures


def _lacks_unused_fields(saved: Any, item: Any) -> bool:
  """Whether the checkpoint lacks top-level fields that item holds as None: fields added to the
  state after it was written that this run does not use (the memory, None for the fixed family),
  restored as None."""
  paths = jax.tree_util.tree_flatten_with_path(item, is_leaf=lambda x: x is None)[0]
  unused = {str(getattr(path[0], "name", getattr(path[0], "key", ""))) for path, leaf in paths
            if leaf is None and path}
  return any(name not in saved for name in unused)


def _shape_mismatch(saved: Any, item: Any) -> str | None:
  """The first parameter (then optimizer state) whose saved shape differs from item's, as text."""
  saved_flat = ocp.tree.to_flat_dict(saved, sep="/")
  item_flat = ocp.tree.to_flat_dict(item, sep="/")
  for key, leaf in item_flat.items():  # A TrainState's params come before its optimizer state.
    if key not in saved_flat:
      return f"it has no {key}, which this config's model has with shape {tuple(leaf.shape)}"
    if tuple(saved_flat[key].shape) != tuple(leaf.shape):
      return (f"{key} has shape {tuple(saved_flat[key].shape)} there but {tuple(leaf.shape)} "
              "with this config")
  for key, leaf in saved_flat.items():
    if key not in item_flat:
      return f"it has {key} with shape {tuple(leaf.shape)}, which this config's model has not"
  return None


def _describe(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= 200 else text[:197] + "..."


def warn_unreadable(manager: ocp.CheckpointManager, failures: list[tuple[int, Exception]],
                     action: str) -> None:
  for step, e in failures:
    logging.warning("checkpoint %s cannot be read (%s); %s", manager.directory / str(step),
                    _describe(e), action)


def unreadable_message(manager: ocp.CheckpointManager, failures: list[tuple[int, Exception]]) -> str:
  steps = ", ".join(str(step) for step, _ in failures)
  return (f"no checkpoint in {manager.directory} can be read (steps {steps}; "
          f"step {failures[0][0]}: {_describe(failures[0][1])})")


def sync(name: str) -> None:
  """All processes wait here, so none reads a directory that process 0 is still changing."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
