"""Stopping on SIGTERM and SIGINT: the loop finishes its step, saves and returns (one or many processes)."""

import os
import signal
import sys
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

# Set once a training loop has written everything: a signal then ends the process with status 0
# (see exit_quietly_when_finished), since nothing is left to lose.
_finished = threading.Event()


class StopSignal:
  """SIGTERM and SIGINT: the loop finishes its step, saves, waits for the write and returns.

  Orbax sees neither signal in a single process. Use as `with StopSignal(manager) as stop:` and
  ask stop(step) once per step; its answer is the same on every process. One process: a flag set
  by the handlers. Several (jax.distributed): JAX's preemption service catches SIGTERM and agrees
  on a step at which every process stops (manager.reached_preemption); SIGINT is forwarded to it
  as a SIGTERM. A second signal ends the process at once, with status 1 and no save (the first
  one's save may be what is stuck); the save itself waits a bounded time (resume.Checkpoints).
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._previous: dict[int, Any] = {}
    self.received: str | None = None  # The name of the signal that asked to stop.
    self._forwarded = False  # Several processes: whether a SIGINT was passed on as a SIGTERM.

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only.
    _finished.clear()
    if jax.process_count() == 1:
      handlers = {signal.SIGTERM: self._handle, signal.SIGINT: self._handle}
    else:
      handlers = {signal.SIGINT: self._forward}
    self._previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    return self

  def __call__(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received is not None
    if self._manager.reached_preemption(step):
      self.received = "SIGTERM (preemption)"
    return self.received is not None

  def finished(self) -> None:
    """The loop has written all it had to: a signal from now on is no failure."""
    _finished.set()

  def __exit__(self, *exc) -> None:
    self._restore()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.received is not None:  # The second: end now.
      _end_at_once(signum)
    self.received = signal.Signals(signum).name

  def _forward(self, signum: int, frame: Any) -> None:
    del frame
    if self._forwarded:
      _end_at_once(signum)
    # Not self.received: every process must stop at the step the preemption service agrees on.
    self._forwarded = True
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service handles SIGTERM (not ours).

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _end_at_once(signum: int) -> None:
  print(f"error: a second {signal.Signals(signum).name}: stopping at once, without saving",
        file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access  (no cleanup: it is what may hang)


def exit_quietly_when_finished() -> None:
  """For a command-line run (main thread): SIGTERM and SIGINT outside the training loop end the
  process as they always do, except once a loop has finished writing: then with status 0."""
  if threading.current_thread() is not threading.main_thread():
    return

  def handle(signum: int, frame: Any) -> None:
    if _finished.is_set():
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(0)  # pylint: disable=protected-access  (everything is written; skip the teardown)
    signal.signal(signum, default[signum])
    if signum == signal.SIGINT:
      default[signum](signum, frame)  # KeyboardInterrupt, as before.
    else:
      os.kill(os.getpid(), signum)

  default = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
  for sig in default:
    signal.signal(sig, handle)
