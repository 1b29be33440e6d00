"""Metric sinks: DIR/metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow)."""

import json
import os
import time
from typing import Any, Mapping

import numpy as np
import tensorboardX


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "dtype"):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class MetricWriter:
  """Writes one JSON object per call to metrics.jsonl and every scalar to TensorBoard.

  Only the process that should write (process 0) passes enabled=True; the others no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._start = time.time()
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(logdir=workdir, flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": round(time.time() - self._start, 3)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, global_step=int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
