"""Metric records: MetricWriter writes WORKDIR/metrics.jsonl and TensorBoard events (tensorboardX,
no TensorFlow); read_metrics reads them back, with what a resumed run redid counted once.
Workdirs may be local paths or fsspec URLs (gs:// with the `gcs` extra installed).
"""

import itertools
import json
import math
import os
import sys
import threading
import time
from typing import Any, Iterator, Mapping

import numpy as np

from chartx import errors, files
from chartx.errors import UserError


def _import_tensorboardx():
  """tensorboardX, imported without PyTorch: its writer imports torch when it is installed (for
  isinstance checks chartx never needs), which cost 220 MB of resident memory and 2 s of start-up
  in every run where chartx[bench] had installed torch (docs/results.md, "Peak memory of a
  training run"). torch is hidden only while tensorboardX imports, and only if nothing has
  imported it yet; a later `import torch` works as usual."""
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError.
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return tensorboardX


tensorboardX = _import_tensorboardx()

METRICS_FILE = "metrics.jsonl"
# Written with every record; not TensorBoard scalars (TensorBoard keeps its own wall time).
TIME_KEYS = ("wall_time", "elapsed")
# A remote object cannot be appended to: it is rewritten whole at most this often (and on close),
# as tensorboardX does with its event files on GCS.
_REMOTE_FLUSH_SECS = 60.0
_writer_ids = itertools.count()
# tensorboardX's writer threads that died, and why: their exception, kept by _keep_tb_failures.
_tb_failures: dict[threading.Thread, BaseException] = {}


def _keep_tb_failures() -> None:
  """Once per process: tensorboardX writes from a thread, and a failed write (a full disk) kills
  that thread with a traceback on stderr while add_scalar goes on queueing (then blocks when the
  queue is full). Its exception is kept instead, for MetricWriter.write to raise in one line."""
  previous = threading.excepthook
  if getattr(previous, "keeps_tb_failures", False):
    return

  def hook(args: Any) -> None:
    if type(args.thread).__module__.startswith("tensorboardX") and not errors.debug():
      _tb_failures[args.thread] = args.exc_value
    else:
      previous(args)

  hook.keeps_tb_failures = True
  threading.excepthook = hook


def _read_tail(path: str, size: int) -> str | None:
  """The last `size` bytes of a local file (from a line start), or None if there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(f.tell() - size, 0))
    return f.read().decode("utf-8", errors="replace")


def _parse_lines(text: str) -> Iterator[dict[str, Any]]:
  """JSON records; a line cut short by a killed process is skipped."""
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and "step" in record:
      yield record


def _compact(value: Any) -> Any:
  """A JSON-ready value; floats keep 7 significant digits (the precision of float32)."""
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "dtype"):
    value = np.asarray(value)
    value = value.item() if value.ndim == 0 else value.tolist()
  if isinstance(value, float) and math.isfinite(value):
    return float(f"{value:.7g}")
  return value


class MetricWriter:
  """Writes one JSON object per call to metrics.jsonl and every number in it to TensorBoard.

  Each record gets "step", "wall_time" (Unix seconds) and "elapsed": seconds of this run's
  wall-clock time, continued across restarts (a resumed run starts from the last record's
  elapsed, so time spent down between sessions does not count).

  A training session passes start_step, the step it resumes from. What an earlier session
  logged after that step (it crashed or was preempted before its next checkpoint, and the new
  session redoes those steps) is then superseded: TensorBoard purges it, and a record
  {"step": start_step, "event": "resume"} tells read_metrics to drop it.
  Only the process that should write (process 0) passes enabled=True; the others no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    self._path = os.path.join(workdir, METRICS_FILE)
    self._remote = files.is_remote(workdir)
    # The end of the file is enough to continue the clock and to see what a restart redoes.
    text = (files.read_text(self._path) if self._remote else _read_tail(self._path, 1 << 20)) or ""
    tail = list(_parse_lines(text[-(1 << 20):]))
    self._offset = float(tail[-1].get("elapsed", 0.0)) if tail else 0.0
    self._start = time.time()
    if self._remote:
      # The whole file is rewritten on flush; a partial last line from a killed run is dropped.
      self._lines = [json.dumps(r) + "\n" for r in _parse_lines(text)]
      self._last_flush = 0.0
    else:
      try:
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(self._path, "a", encoding="utf-8")
        if text and not text.endswith("\n"):
          self._jsonl.write("\n")  # End a line cut short by a killed run before appending.
      except OSError as e:
        raise errors.write_failed(self._path, e) from e
    resumed = start_step is not None and any(r["step"] > start_step for r in tail)
    # tensorboardX names event files by the second they open: the suffix keeps two writers
    # opened within one second from overwriting each other's file.
    _keep_tb_failures()
    # A queue long enough that the events of one record never block on a dead writer thread.
    self._tb = tensorboardX.SummaryWriter(logdir=workdir, flush_secs=30, max_queue=1000,
                                          purge_step=start_step + 1 if resumed else None,
                                          filename_suffix=f".{os.getpid()}.{next(_writer_ids)}")
    self._tb_events = self._tb.file_writer.event_writer  # tensorboardX's EventFileWriter.
    if resumed:
      self._append({"step": int(start_step), "event": "resume"})

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = self._append({"step": int(step), **{k: _compact(v) for k, v in scalars.items()}})
    self._check_tb()
    for key, value in record.items():
      if key not in ("step", *TIME_KEYS) and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(key, value, global_step=int(step), walltime=record["wall_time"])

  def _append(self, record: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    record = {"step": record.pop("step"), "wall_time": round(now, 3),
              "elapsed": round(self._offset + now - self._start, 3), **record}
    line = json.dumps(record) + "\n"
    if self._remote:
      self._lines.append(line)
      if now - self._last_flush >= _REMOTE_FLUSH_SECS:
        self._flush_remote()
    else:
      try:
        self._jsonl.write(line)
        self._jsonl.flush()
      except OSError as e:
        self._abandon()
        raise errors.write_failed(self._path, e) from e
    return record

  def _flush_remote(self) -> None:
    files.write_text(self._path, "".join(self._lines))
    self._last_flush = time.time()

  def _check_tb(self) -> None:
    """errors.WriteFailed if tensorboardX's writer thread died of a failed write."""
    worker = self._tb_events._worker  # pylint: disable=protected-access  (no public way to ask)
    failure = _tb_failures.get(worker)
    if failure is not None or (worker is not None and not worker.is_alive()):
      path = self._tb_path()
      self._abandon()
      raise errors.write_failed(path, failure or RuntimeError("the writer thread stopped"))

  def _abandon(self) -> None:
    """After a failed write: nothing more is written, and nothing fails again at exit (Python
    flushes open files, tensorboardX closes its writers from atexit)."""
    self.enabled = False
    self._tb_events._closed = True  # pylint: disable=protected-access  (its close: a no-op)
    if not self._remote:
      try:
        self._jsonl.close()
      except OSError:
        pass  # Its unwritten end: the line that failed.

  def _tb_path(self) -> str:
    return self._tb_events._ev_writer._file_name  # pylint: disable=protected-access

  def close(self) -> None:
    if not self.enabled:
      return
    if self._remote:
      self._flush_remote()
    else:
      try:
        self._jsonl.close()
      except OSError as e:
        self._abandon()
        raise errors.write_failed(self._path, e) from e
    self._check_tb()
    try:
      self._tb.close()
    except OSError as e:
      path = self._tb_path()
      self._abandon()
      raise errors.write_failed(path, e) from e
    self.enabled = False


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl in order, as the final run sees them.

  At a {"step": s, "event": "resume"} record (see MetricWriter) the records logged after step
  s by the abandoned session are dropped; the marker itself is not returned.
  """
  path = os.path.join(workdir, METRICS_FILE)
  text = files.read_text(path)
  if text is None:
    raise UserError(f"{path}: no such file (is {workdir} a chartx workdir that has trained?)")
  records: list[dict[str, Any]] = []
  for record in _parse_lines(text):
    if record.get("event") == "resume":
      records = [r for r in records if r["step"] <= record["step"]]
    else:
      records.append(record)
  return records
