"""The train loop's checkpoints: resume or initialize (fine-tuning, set-aside runs), then save on schedule."""

import math
import threading
import time
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from chartx import checkpoint, errors
from chartx.errors import UserError

# How long the loop waits for a checkpoint to finish writing before it gives up on it (a stuck disk).
SAVE_TIMEOUT_SECS = 120.0


class Checkpoints:
  """The train loop's checkpoints: resume or initialize, then save on schedule, at a new best
  validation bpc and on request. As a context manager, waits for the last save on exit."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self._config = config
    if not config.checkpoint.resume:
      set_aside_run(checkpoint.checked_directory(workdir))
    self.manager = checkpoint.make_manager(workdir, config)
    self._best = math.inf  # The lowest validation bpc among the checkpoints.
    self._writing: int | None = None  # The step of a save that may still be in flight.
    self._failed = False  # Whether a save failed (and was reported).
    errors.quiet_library_errors()  # A failed save is reported by check(), in one line.

  def restore_or_init(self, state: Any) -> Any:
    """The newest readable checkpoint restored onto state's shardings; else state, with the
    parameters of config.checkpoint.init_from's newest checkpoint if that is set.

    Half-written saves (Orbax temporary directories) are removed and newer checkpoints that cannot
    be read are set aside, each with a warning naming it. If checkpoints exist but none can be
    read, raises UserError rather than start over.
    """
    self._remove_temporary()
    steps = sorted(self.manager.all_steps(), reverse=True)
    restored, step, failures = checkpoint.read_newest(self.manager, steps, state, params_only=False)
    if failures and step is None:
      raise UserError(checkpoint.unreadable_message(self.manager, failures) + "; training does not start "
                      "over them: move them away, or set config.checkpoint.resume=False")
    if failures:
      self._set_aside_unreadable(failures)
    if step is not None:
      best = checkpoint.best_checkpoint(self.manager)
      self._best = math.inf if best is None else best[1]
      return restored
    init_from = self._config.checkpoint.init_from
    if not init_from:
      return state
    try:
      params, init_step = checkpoint.restore_params(init_from, state.params)
    except UserError as e:
      raise UserError(f"config.checkpoint.init_from={init_from}: {e}") from e
    if jax.process_index() == 0:
      print(f"train: parameters from {checkpoint.checkpoint_dir(init_from) / str(init_step)}; "
            "step 0 with a fresh optimizer state", flush=True)
    return state.replace(params=params)

  def due(self, step: int, validation: Mapping[str, Any] | None, stop: bool) -> bool:
    """Whether the loop saves after `step`: every train.checkpoint_every steps, at the last step,
    at an eval step with a new lowest validation bpc, and when stopping on a signal (a
    checkpoint_every of 0 turns all of them off)."""
    every = self._config.train.checkpoint_every
    if not every:
      return False
    return (stop or step % every == 0 or step == self._config.train.num_steps
            or (validation is not None and validation.get(checkpoint.BEST_METRIC, math.inf) < self._best))

  def save(self, step: int, state: Any, validation: Mapping[str, Any] | None = None) -> None:
    self.wait()  # The previous save's failure, in our words, before Orbax waits for it.
    checkpoint.save(self.manager, step, state, validation, self._config)
    self._writing = step
    if validation is not None:
      self._best = min(self._best, validation.get(checkpoint.BEST_METRIC, math.inf))

  def check(self) -> None:
    """Once a step: errors.WriteFailed as soon as an asynchronous save has failed."""
    if self._writing is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self, timeout: float = SAVE_TIMEOUT_SECS) -> None:
    """Waits at most `timeout` seconds for the save in flight; errors.WriteFailed if it failed or
    did not finish (a stuck write), naming the newest complete checkpoint."""
    step, self._writing = self._writing, None
    if step is None:
      return
    failure: list[BaseException] = []

    def wait_for_orbax() -> None:
      try:
        self.manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except  (TensorStore raises ValueError)
        failure.append(e)

    # In a thread (a daemon: it must not hold the process's exit), so that the wait has a bound.
    waiter = threading.Thread(target=wait_for_orbax, name="chartx_save_wait", daemon=True)
    waiter.start()
    waiter.join(timeout)
    path = self.manager.directory / str(step)
    self._failed = waiter.is_alive() or bool(failure)
    if waiter.is_alive():
      raise errors.WriteFailed(f"{path} did not finish writing in {timeout:.0f} s: "
                               f"{self.complete(besides=step)}", checkpoint_note=True)
    if failure:
      raise errors.WriteFailed(f"{errors.cause(failure[0])} writing {path}: "
                               f"{self.complete(besides=step)}", checkpoint_note=True) from failure[0]

  def complete(self, besides: int | None = None) -> str:
    """Which checkpoint a run that stops now resumes from (not `besides`, one that failed)."""
    steps = [s for s in self.manager.all_steps() if s != besides and s != self._writing]
    if not steps:
      return "there is no complete checkpoint yet"
    return f"the last complete checkpoint is step {max(steps)}"

  def newest(self) -> str:
    return checkpoint.describe_newest(self.manager)

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Waits (bounded) for a save in flight, even when the loop raised; a failed write of the
    metrics gets the newest complete checkpoint added to its message."""
    try:
      self.wait()  # A failed save's WriteFailed replaces the loop's exception: it says more.
    finally:
      if not self._failed:
        self.manager.close()
      # else Orbax's close would raise the reported failure again, or wait on a stuck write.
    if isinstance(exc, errors.WriteFailed) and not exc.checkpoint_note:
      raise errors.WriteFailed(f"{exc}: {self.complete()}", checkpoint_note=True) from exc

  def _remove_temporary(self) -> None:
    directory = self.manager.directory
    temporary = [t.get() for t in ocp.path.step.all_temporary_paths(directory)]
    for path in temporary:
      logging.warning("removing %s: a checkpoint that was still being written when a run stopped",
                      path)
    if temporary and jax.process_index() == 0:
      for path in temporary:
        path.rmtree()
    checkpoint.sync("chartx_checkpoint_remove_temporary")

  def _set_aside_unreadable(self, failures: list[tuple[int, Exception]]) -> None:
    """Renames checkpoints that failed to read out of Orbax's sight: a later save of the same
    step must not collide with them, and a transient error leaves nothing lost."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    checkpoint.warn_unreadable(self.manager, failures,
                               f"renaming it to <step>.unreadable-{stamp} and skipping")
    if jax.process_index() == 0:
      for step, _ in failures:
        path = self.manager.directory / str(step)
        path.rename(path.parent / f"{step}.unreadable-{stamp}")
    checkpoint.sync("chartx_checkpoint_set_aside")
    self.manager.reload()


def set_aside_run(directory: epath.Path) -> None:
  """config.checkpoint.resume=False: renames an earlier run's checkpoints, never deletes them."""
  if not directory.exists() or not any(directory.iterdir()):
    return
  target = directory.parent / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
  logging.warning("config.checkpoint.resume=False: moving the existing %s to %s and starting "
                  "at step 0", directory, target)
  if jax.process_index() == 0:
    directory.rename(target)
  checkpoint.sync("chartx_checkpoint_replace")
