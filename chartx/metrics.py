"""Observability: metrics.jsonl and TensorBoard events, reading them back, progress, and MFU.

  MetricWriter      one JSON object per logged step in WORKDIR/metrics.jsonl, every number also
                    a TensorBoard scalar (tensorboardX: no TensorFlow needed).
  read_metrics      the records of a workdir, with what a resumed run redid counted once.
  Progress          a tqdm bar on a terminal; plain periodic lines elsewhere (CI, cluster logs).
  flops_per_char    model FLOPs of one training character; with peak_flops, the MFU.

Workdirs may be local paths or fsspec URLs (gs:// with the `gcs` extra installed).
"""

import itertools
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Mapping, TextIO

import numpy as np
import tensorboardX
import tqdm

from chartx.errors import UserError

METRICS_FILE = "metrics.jsonl"
# Written with every record; not TensorBoard scalars (TensorBoard keeps its own wall time).
TIME_KEYS = ("wall_time", "elapsed")
# A remote object cannot be appended to: it is rewritten whole at most this often (and on close),
# as tensorboardX does with its event files on GCS.
_REMOTE_FLUSH_SECS = 60.0
_writer_ids = itertools.count()


def _is_remote(path: str) -> bool:
  return "://" in path


def _fsspec():
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("a gs:// (or other URL) workdir needs fsspec and gcsfs: "
                    "pip install 'chartx[gcs]'") from None
  return fsspec


def _read_text(path: str) -> str | None:
  """The file's text, or None if there is no such file."""
  if _is_remote(path):
    fs, fs_path = _fsspec().core.url_to_fs(path)
    return fs.cat_file(fs_path).decode("utf-8") if fs.exists(fs_path) else None
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


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
    self._remote = _is_remote(workdir)
    # The end of the file is enough to continue the clock and to see what a restart redoes.
    text = (_read_text(self._path) if self._remote else _read_tail(self._path, 1 << 20)) or ""
    tail = list(_parse_lines(text[-(1 << 20):]))
    self._offset = float(tail[-1].get("elapsed", 0.0)) if tail else 0.0
    self._start = time.time()
    if self._remote:
      # The whole file is rewritten on flush; a partial last line from a killed run is dropped.
      self._lines = [json.dumps(r) + "\n" for r in _parse_lines(text)]
      self._last_flush = 0.0
    else:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self._path, "a", encoding="utf-8")
      if text and not text.endswith("\n"):
        self._jsonl.write("\n")  # End a line cut short by a killed run before appending.
    resumed = start_step is not None and any(r["step"] > start_step for r in tail)
    # tensorboardX names event files by the second they open: the suffix keeps two writers
    # opened within one second from overwriting each other's file.
    self._tb = tensorboardX.SummaryWriter(logdir=workdir, flush_secs=30,
                                          purge_step=start_step + 1 if resumed else None,
                                          filename_suffix=f".{os.getpid()}.{next(_writer_ids)}")
    if resumed:
      self._append({"step": int(start_step), "event": "resume"})

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = self._append({"step": int(step), **{k: _compact(v) for k, v in scalars.items()}})
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
      self._jsonl.write(line)
      self._jsonl.flush()
    return record

  def _flush_remote(self) -> None:
    with _fsspec().open(self._path, "w", encoding="utf-8") as f:
      f.write("".join(self._lines))
    self._last_flush = time.time()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._remote:
      self._flush_remote()
    else:
      self._jsonl.close()
    self._tb.close()
    self.enabled = False


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl in order, as the final run sees them.

  At a {"step": s, "event": "resume"} record (see MetricWriter) the records logged after step
  s by the abandoned session are dropped; the marker itself is not returned.
  """
  path = os.path.join(workdir, METRICS_FILE)
  text = _read_text(path)
  if text is None:
    raise UserError(f"{path}: no such file (is {workdir} a chartx workdir that has trained?)")
  records: list[dict[str, Any]] = []
  for record in _parse_lines(text):
    if record.get("event") == "resume":
      records = [r for r in records if r["step"] <= record["step"]]
    else:
      records.append(record)
  return records


# ---------------------------------------------------------------------------------------------
# Progress

def format_duration(seconds: float) -> str:
  """3.2 -> '3s', 125 -> '2m05s', 7384 -> '2h03m', 200000 -> '2d07h'."""
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_number(x: float) -> str:
  """A short human-readable number: 987 -> '987', 35236 -> '35.2k', 2.1e9 -> '2.10G'."""
  for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{suffix}"
  return f"{x:.3g}"


def _format_postfix(postfix: Mapping[str, Any], sep: str) -> str:
  def fmt(value):
    if isinstance(value, str):
      return value
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
  return sep.join(f"{k} {fmt(v)}" for k, v in postfix.items())


class Progress:
  """Progress of long work: a tqdm bar on a terminal, plain lines elsewhere.

      with metrics.Progress(len(batches), "eval", unit="batch") as progress:
        for batch in batches:
          ...
          progress.update(1, bpc=f"{bpc:.4f}")

  Off a terminal (CI, cluster logs, a file) it prints a line like
      eval 120/500 (24%)  3.10 batch/s  ETA 2m03s  bpc 1.2345
  every `every_secs` seconds, whenever update(..., line=True) asks for one, and when it closes.
  Rates and ETAs start after the first update, which often carries start-up (compilation); on a
  terminal the bar appears then. The rate on a line is the one since the previous line, the
  ETA uses the average. `postfix` values (strings, or numbers formatted briefly) stay shown
  until replaced. enabled=False (processes other than 0) prints nothing. Output goes to `file`
  (stderr by default, like tqdm), so stdout keeps only results.
  """

  def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
               every_secs: float = 30.0, enabled: bool = True, file: TextIO | None = None):
    self.total, self.desc, self.unit, self.n = total, desc, unit, initial
    self.enabled = enabled
    self._file = sys.stderr if file is None else file
    self._terminal = _is_terminal(self._file)
    self._every_secs = every_secs
    self._postfix: dict[str, Any] = {}
    self._start = time.monotonic()
    self._start_n = initial
    self._first: tuple[float, int] | None = None  # (time, n) right after the first update.
    self._line: tuple[float, int] = (self._start, initial)  # (time, n) at the last line.
    self._bar: tqdm.tqdm | None = None

  def update(self, n: int = 1, *, line: bool = False, **postfix: Any) -> None:
    """Advances by n; postfix values are shown from now on; line=True prints a line now."""
    if not self.enabled:
      return
    self.n += n
    self._postfix.update(postfix)
    now = time.monotonic()
    if self._first is None:
      self._first = (now, self.n)
      if self._terminal:
        self._bar = tqdm.tqdm(total=self.total, initial=self.n, desc=self.desc, unit=self.unit,
                              file=self._file, dynamic_ncols=True)
        n = 0  # Already counted in `initial`.
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix_str(_format_postfix(self._postfix, ", "), refresh=False)
      if n:
        self._bar.update(n)
      else:
        self._bar.refresh()
    elif not self._terminal and (line or now - self._line[0] >= self._every_secs):
      self._print_line(now)

  def write(self, text: str) -> None:
    """Prints a line of its own (above the bar on a terminal)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self._file)
    else:
      print(text, file=self._file, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    self.enabled = False
    if self._bar is not None:
      self._bar.close()
      return
    elapsed = time.monotonic() - self._start
    done = f"{self.n:,}/{self.total:,}" if self.total is not None else f"{self.n:,} {self.unit}"
    first_time, first_n = self._first or (self._start, self._start_n)
    rate = _per_sec(self.n - first_n, time.monotonic() - first_time)
    print(f"{self.desc} {done} in {format_duration(elapsed)}  ({_rate(rate, self.unit)})",
          file=self._file, flush=True)

  def _print_line(self, now: float) -> None:
    first_time, first_n = self._first
    since_time, since_n = max(self._line, self._first)
    rate = _per_sec(self.n - since_n, now - since_time)
    if self.total:
      average = _per_sec(self.n - first_n, now - first_time)
      eta = (self.total - self.n) / average if average > 0 else math.inf
      parts = [f"{self.desc} {self.n:,}/{self.total:,} ({100 * self.n / self.total:.0f}%)",
               _rate(rate, self.unit), f"ETA {format_duration(eta)}"]
    else:
      parts = [f"{self.desc} {self.n:,} {self.unit}", _rate(rate, self.unit)]
    if self._postfix:
      parts.append(_format_postfix(self._postfix, "  "))
    print("  ".join(parts), file=self._file, flush=True)
    self._line = (now, self.n)

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _per_sec(count: float, seconds: float) -> float:
  return count / seconds if seconds > 0 else 0.0


def _rate(rate: float, unit: str) -> str:
  return f"{format_number(rate)} {unit}/s" if rate >= 0.1 else f"{format_duration(1 / rate) if rate else '?'}/{unit}"


def _is_terminal(file: TextIO) -> bool:
  isatty = getattr(file, "isatty", None)
  return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


# ---------------------------------------------------------------------------------------------
# Model FLOPs utilization

def flops_per_char(model_cfg: Any, seq_len: int, intermediate_layers: bool = True) -> float:
  """Model FLOPs of one training character (forward and backward), for MFU.

  MaxText's count (calculate_tflops_training_per_device), applied to this model:
    - 6 x the non-embedding matmul parameters per character: per layer 4 d^2 (query, key, value,
      output) + 2 d f (feed-forward);
    - causal attention, 6 x n_layers x seq_len x d per character: the scores and the weighted sum
      are 2 x 2 seq_len d multiply-adds forward per character, halved by the causal mask, times 3
      for forward and backward;
    - the classifiers that really run: 6 d V per character for each of K targets (1 + the extra
      characters ahead), on every layer when intermediate_layers (their loss stops at l/(2n) of
      training but the heads keep running), else on the last layer only.
  Not counted, by the usual convention: recomputation (remat), layer norms, softmaxes, biases.
  model_cfg is a chartx.model.ModelConfig.
  """
  d, f, n = model_cfg.d_model, model_cfg.d_ff, model_cfg.num_layers
  matmuls = 6 * n * (4 * d * d + 2 * d * f)
  attention = 6 * n * seq_len * d
  heads = 6 * (n if intermediate_layers else 1) * model_cfg.num_targets * d * model_cfg.vocab_size
  return float(matmuls + attention + heads)


# Dense bf16 peak FLOP/s per JAX device, matched in order against device_kind (lower case).
# TPU v2 and v3 expose each of a chip's two TensorCores as a device: half the chip's peak.
# Sources (per chip): cloud.google.com/tpu/docs/v2 (45 TFLOP/s), /v3 (123), /v4 (275),
# /v5e (197), /v5p (459), /v6e (918). NVIDIA datasheets give BF16 Tensor Core figures "with
# sparsity", twice the dense peak: A100 312 dense (nvidia.com/en-us/data-center/a100),
# H100 SXM 1,979/2, H100 NVL 1,671/2, H100 PCIe 1,513/2 (nvidia.com/en-us/data-center/h100),
# H200 SXM 1,979/2, H200 NVL 1,671/2 (nvidia.com/en-us/data-center/h200).
_PEAK_FLOPS = (
    ("tpu v2", 45e12 / 2),
    ("tpu v3", 123e12 / 2),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p ("TPU v5" or "TPU v5p")
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("a100", 312e12),
    ("h100 nvl", 1671e12 / 2),
    ("h100 pcie", 1513e12 / 2),
    ("h100", 1979e12 / 2),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", 1671e12 / 2),
    ("h200", 1979e12 / 2),
)


def peak_flops(device: Any) -> float | None:
  """Dense bf16 peak FLOP/s of one JAX device, or None when unknown (CPUs, other accelerators).

  MFU = flops_per_char * chars_per_sec / (peak_flops(jax.devices()[0]) * jax.device_count()).
  """
  if getattr(device, "platform", "") == "cpu":
    return None
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, peak in _PEAK_FLOPS:
    if name in kind:
      return peak
  return None
