"""train.profile_steps: a JAX profiler trace of a range of training steps, written into
WORKDIR/plugins/profile/<time>/ where TensorBoard's profile plugin finds it
(pip install tensorboard-plugin-profile; tensorboard --logdir WORKDIR, then the PROFILE tab).
Each step is annotated (jax.profiler.StepTraceAnnotation), so the plugin's step-time views
split the trace by step.
"""

import contextlib
import os
import sys

import jax

from chartx.errors import UserError


def parse_steps(spec: str) -> tuple[int, int] | None:
  """(start, stop) from train.profile_steps ("START,STOP", 0 <= START < STOP); None for ""."""
  if not spec:
    return None
  parts = spec.split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
    raise UserError(f"config.train.profile_steps={spec!r} must be \"START,STOP\" with "
                    "0 <= START < STOP (steps START..STOP-1 are traced), or \"\" for none")
  return int(parts[0]), int(parts[1])


class StepProfiler:
  """Traces the steps in [start, stop) of a loop (training's, or the bench's); every process traces
  its own host. As a context manager, ends a trace still running when the loop ends (or fails).
  label names the steps in the trace and in the line on stderr that says where it is."""

  def __init__(self, spec: str, workdir: str, label: str = "train"):
    self._range = parse_steps(spec)
    self._workdir = workdir
    self._label = label
    self._active = False

  def step(self, step: int) -> contextlib.AbstractContextManager:
    """Around the dispatch of step `step`: starts the trace at its first step, and annotates."""
    if self._range and self._range[0] <= step < self._range[1] and not self._active:
      jax.profiler.start_trace(self._workdir)
      self._active = True
    return jax.profiler.StepTraceAnnotation(self._label, step_num=step)

  def done(self, step: int, out: object) -> None:
    """After step `step` (0-based) was dispatched: ends the trace after its last step."""
    if self._active and step + 1 >= self._range[1]:
      jax.block_until_ready(out)  # The trace should hold the device's work of the last step.
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._active = False
    if jax.process_index() == 0:
      print(f"{self._label}: profile of steps {self._range[0]}..{self._range[1] - 1} in "
            f"{os.path.join(self._workdir, 'plugins', 'profile')}", file=sys.stderr, flush=True)

  def __enter__(self) -> "StepProfiler":
    return self

  def __exit__(self, *exc) -> None:
    if self._active:
      self._stop()
