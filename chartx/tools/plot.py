"""Learning curves of one or more runs, as a PNG: python -m chartx.plot WORKDIR [WORKDIR ...].

Three panels, one colour per run: train and validation bpc against steps, the same against
wall-clock time (metrics.jsonl's "elapsed"), and the auxiliary-loss weights over training (the
share of intermediate layers whose loss is still on, and the weight of each extra target). A
WORKDIR without metrics.jsonl whose subdirectories have one (a chartx.sweep root) stands for
those runs. Needs matplotlib: pip install 'chartx[plot]'.

  --out=FILE.png   where to write; default curves.png in the one WORKDIR, or in the directory
                   the WORKDIRs share.
  --title=TEXT     a title over the panels.
"""

import argparse
import io
import json
import math
import os
import sys
from typing import Any, Sequence

import numpy as np

from chartx import errors, files, metrics
from chartx.errors import UserError

_TRAIN_SMOOTHING = 0.6  # As TensorBoard's default: an exponential moving average over log steps.


def find_runs(paths: Sequence[str]) -> list[str]:
  """The run directories: each path with metrics.jsonl, or a sweep root's subdirectories with one."""
  runs = []
  for path in paths:
    path = path.rstrip("/") or "/"
    if files.exists(os.path.join(path, metrics.METRICS_FILE)):
      runs.append(path)
      continue
    if not files.is_dir(path):
      raise UserError(f"{path}: no such directory")
    subdirs = _sweep_order(path) or [
        os.path.join(path, d) for d in files.list_dir(path)
        if files.exists(os.path.join(path, d, metrics.METRICS_FILE))]
    if not subdirs:
      raise UserError(f"{path}: no {metrics.METRICS_FILE} in it or in its subdirectories")
    runs += subdirs
  return runs


def _sweep_order(root: str) -> list[str]:
  """A chartx.sweep root's runs in the sweep's order (from sweep.json), if it has one."""
  try:
    rows = json.loads(files.read_text(os.path.join(root, "sweep.json")) or "[]")
  except (OSError, ValueError):
    return []
  return [os.path.join(root, row["name"]) for row in rows
          if files.exists(os.path.join(root, row["name"], metrics.METRICS_FILE))]


def labels(runs: Sequence[str]) -> list[str]:
  """Short names: the directory names, or paths under the common parent when those clash."""
  names = [os.path.basename(_absolute(run)) for run in runs]
  if len(set(names)) == len(names):
    return names
  common = os.path.commonpath([_absolute(run) for run in runs])
  return [os.path.relpath(_absolute(run), common) for run in runs]


def _absolute(run: str) -> str:
  """A local run's absolute path; a URL's path after its scheme (gs://b/r: /b/r)."""
  return "/" + run.split("://", 1)[1].strip("/") if files.is_remote(run) else os.path.abspath(run)


def default_out(runs: Sequence[str]) -> str:
  if len(runs) == 1:
    return os.path.join(runs[0], "curves.png")
  common = os.path.commonpath([_absolute(run) for run in runs])
  schemes = {run.split("://", 1)[0] for run in runs if files.is_remote(run)}
  if len(schemes) == 1 and all(files.is_remote(run) for run in runs):
    return f"{schemes.pop()}://{common.lstrip('/')}/curves.png"
  return os.path.join(common if os.access(common, os.W_OK) else ".", "curves.png")


def series(records: Sequence[dict[str, Any]], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
  """(x_N, y_N) of the records that have `key` (and `x`)."""
  pairs = [(r[x], r[key]) for r in records if key in r and x in r and r[key] is not None]
  if not pairs:
    return np.zeros(0), np.zeros(0)
  x_N, y_N = np.asarray(pairs, np.float64).T
  return x_N, y_N


def smooth(y_N: np.ndarray, weight: float = _TRAIN_SMOOTHING) -> np.ndarray:
  """Exponential moving average, debiased so the first points are not pulled towards zero."""
  out_N, avg = np.empty_like(y_N), 0.0
  for i, y in enumerate(y_N):
    avg = weight * avg + (1 - weight) * y
    out_N[i] = avg / (1 - weight ** (i + 1))
  return out_N


def eval_keys(records: Sequence[dict[str, Any]]) -> list[str]:
  """The held-out bpc keys of a run, e.g. validation_bpc (training) and eval_test_bpc (--mode=eval)."""
  keys: list[str] = []
  for record in records:
    keys += [k for k in record if k.endswith("_bpc") and k not in keys]
  return keys


def weight_series(records: Sequence[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """'intermediate layers' (mean weight of layers 1..n-1) and 'ahead k' (weight of target k)."""
  train = [r for r in records if "bpc" in r]
  layer_keys = sorted({k for r in train for k in r if k.startswith("weight/layer_")},
                      key=lambda k: int(k.rsplit("_", 1)[1]))
  out = {}
  if len(layer_keys) > 1:  # The last layer's weight is always 1; the others are the aux loss.
    steps = np.asarray([r["step"] for r in train], np.float64)
    share = np.asarray([np.mean([r.get(k, 0.0) for k in layer_keys[:-1]]) for r in train])
    out["intermediate layers"] = (steps, share)
  for key in sorted({k for r in train for k in r if k.startswith("weight/ahead_")}):
    out[f"{key.rsplit('_', 1)[1]} ahead"] = series(train, key)
  return out


def _time_axis(seconds: float) -> tuple[float, str]:
  if seconds >= 3 * 3600:
    return 3600.0, "hours"
  if seconds >= 3 * 60:
    return 60.0, "minutes"
  return 1.0, "seconds"


def _bpc_limits(curves: Sequence[np.ndarray]) -> tuple[float, float] | None:
  """y limits that show the learning rather than the first steps' 8 bits: the top is the
  highest value after the first fifth of each curve (all of it when short)."""
  values = [c for c in curves if len(c)]
  if not values:
    return None
  low = min(float(c.min()) for c in values)
  high = max(float(c[len(c) // 5:].max()) if len(c) >= 5 else float(c.max()) for c in values)
  pad = 0.05 * max(high - low, 0.1)
  return low - pad, high + pad


def plot(runs: Sequence[str], out: str, title: str | None = None) -> str:
  """Writes the learning curves of runs (workdirs) to out (a PNG); returns out."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("chartx.plot needs matplotlib: pip install 'chartx[plot]'") from None

  records = {run: metrics.read_metrics(run) for run in runs}
  # Line styles by name, the same in every run and in the legends.
  held_out = list(dict.fromkeys(k for rs in records.values() for k in eval_keys(rs)))
  weights = sorted({n for rs in records.values() for n in weight_series(rs)},
                   key=lambda n: (n != "intermediate layers", n))
  dashes = ("-", "--", ":", "-.")
  max_elapsed = max((r.get("elapsed", 0.0) for rs in records.values() for r in rs), default=0.0)
  time_scale, time_unit = _time_axis(max_elapsed)
  colors = plt.get_cmap("tab10").colors

  fig, (ax_step, ax_time, ax_weight) = plt.subplots(1, 3, figsize=(17, 5.2))
  bpc_curves, handles = [], []
  for i, (run, label) in enumerate(zip(runs, labels(runs))):
    rs, color = records[run], colors[i % len(colors)]
    final = []
    for ax, x in ((ax_step, "step"), (ax_time, "elapsed")):
      x_N, y_N = series(rs, "bpc", x)
      if x == "elapsed":
        x_N = x_N / time_scale
      if len(y_N):
        ax.plot(x_N, y_N, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(x_N, smooth(y_N), color=color, linewidth=1.4)
        bpc_curves.append(smooth(y_N))  # The raw points may run off the limits.
      for key in eval_keys(rs):
        ex_N, ey_N = series(rs, key, x)
        if x == "elapsed":
          ex_N = ex_N / time_scale
        j = held_out.index(key)
        ax.plot(ex_N, ey_N, color=color, linewidth=2.2, marker="os^v"[j % 4], markersize=4,
                linestyle=dashes[j % 4])
        bpc_curves.append(ey_N)
    _, train_N = series(rs, "bpc")
    if len(train_N):
      final.append(f"train (smoothed) {smooth(train_N)[-1]:.3f}")
    for key in eval_keys(rs):
      _, ey_N = series(rs, key)
      final.append(f"{key.removesuffix('_bpc').replace('_', ' ')} {ey_N[-1]:.3f}")
    for name, (x_N, w_N) in weight_series(rs).items():
      # Runs often share a schedule: each later run is drawn thinner on top, so all show.
      ax_weight.step(x_N, w_N, where="post", color=color, linewidth=max(4.5 - 1.2 * i, 1.0),
                     linestyle=dashes[weights.index(name) % 4])
    steps = max((r["step"] for r in rs), default=0)
    handles.append(Line2D([], [], color=color, linewidth=2.2,
                          label=f"{label}  (step {steps:,}; bpc {', '.join(final) or 'none logged'})"))

  limits = _bpc_limits(bpc_curves)
  for ax, xlabel in ((ax_step, "step"), (ax_time, f"wall-clock time ({time_unit})")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("bits per character")
    ax.grid(alpha=0.3)
    if limits:
      ax.set_ylim(*limits)
  ax_step.set_title("bpc against steps")
  ax_time.set_title("bpc against wall-clock time")
  ax_step.legend(handles=[Line2D([], [], color="gray", linewidth=1.4, label="train (smoothed; faint: raw)")] + [
      Line2D([], [], color="gray", linewidth=2.2, marker="os^v"[j % 4], markersize=4,
             linestyle=dashes[j % 4], label=key.removesuffix("_bpc").replace("_", " "))
      for j, key in enumerate(held_out)], loc="upper right", fontsize=8)

  ax_weight.set_title("auxiliary-loss weights")
  ax_weight.set_xlabel("step")
  ax_weight.set_ylabel("weight")
  ax_weight.set_ylim(-0.05, 1.1)
  ax_weight.grid(alpha=0.3)
  if weights:
    ax_weight.legend(handles=[Line2D([], [], color="gray", linewidth=1.6, linestyle=dashes[j % 4],
                                     label=("intermediate layers: share with loss on" if n == "intermediate layers"
                                            else f"target {n}: weight"))
                              for j, n in enumerate(weights)], loc="upper right", fontsize=8)
  else:
    ax_weight.text(0.5, 0.5, "no weight/* metrics logged", ha="center", va="center",
                   transform=ax_weight.transAxes, color="gray")

  fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 2), fontsize=9,
             frameon=False)
  if title:
    fig.suptitle(title)
  rows = math.ceil(len(handles) / 2)
  fig.tight_layout(rect=(0, 0.04 + 0.035 * rows, 1, 0.95 if title else 1))
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  files.write_bytes(out, png.getvalue())
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m chartx.plot",
                                   description="Learning curves of chartx runs as a PNG.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                      help="run directories (or a chartx.sweep root)")
  parser.add_argument("--out", help="PNG to write (default: curves.png beside the runs)")
  parser.add_argument("--title", help="title over the panels")
  args = parser.parse_args(argv)
  return errors.status_of(_plot, args)


def _plot(args: argparse.Namespace) -> int:
  runs = find_runs(args.workdirs)
  out = plot(runs, args.out or default_out(runs), args.title)
  print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
