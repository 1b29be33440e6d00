"""Stopping on SIGTERM and SIGINT: the loop finishes its step, saves and returns (one or many processes)."""

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class StopSignal:
  """SIGTERM and SIGINT: the loop finishes its step, saves, waits for the write and returns.

  Orbax sees neither signal in a single process. Use as `with StopSignal(manager) as stop:` and
  ask stop(step) once per step; its answer is the same on every process. One process: a flag set
  by the handlers. Several (jax.distributed): JAX's preemption service catches SIGTERM and agrees
  on a step at which every process stops (manager.reached_preemption); SIGINT is forwarded to it
  as a SIGTERM. After the first signal the previous handlers are back, so a second one acts at once.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._previous: dict[int, Any] = {}
    self.received: str | None = None  # The name of the signal that asked to stop.

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only.
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

  def __exit__(self, *exc) -> None:
    self._restore()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.received = signal.Signals(signum).name
    self._restore()

  def _forward(self, signum: int, frame: Any) -> None:
    del signum, frame
    self._restore()
    os.kill(os.getpid(), signal.SIGTERM)

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
