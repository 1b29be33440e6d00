"""Progress of long work on stderr: a tqdm bar on a terminal, plain periodic lines elsewhere
(CI, cluster logs); and short human-readable numbers and durations."""

import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

import tqdm


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

      with progress.Progress(len(batches), "eval", unit="batch") as progress:
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
