"""Config sweeps: run a grid of --config overrides, one chartx.main process each, and tabulate.

    python -m chartx.sweep --config=configs/tiny.py --workdir=/tmp/sweep \\
        --grid loss.multiple_targets=1,2 --grid model.num_layers=2,4 --config.train.num_steps=200

runs the 4 combinations, each in its own WORKDIR/<name> (for example
/tmp/sweep/loss.multiple_targets=1,model.num_layers=2), then prints a markdown table of their
final train and validation bpc and writes it to WORKDIR/sweep.md (and WORKDIR/sweep.json).

  --grid KEY=V1,V2,...   one axis of the grid (repeatable); the runs are the product of all axes.
  --sweep=FILE.py        a Python file whose get_sweep() returns the runs: a dict {name: {key:
                         value}} or a list of {key: value}.
  --config.KEY=VALUE     passed to every run, as chartx.main takes it.
  --dry_run              print the commands and run nothing.
A sweep file combines with --grid (every run of one with every point of the other). The paper's
ablation is python -m chartx.reproduce, which scores every row with one protocol (a sweep's
validation bpc is each run's strided eval.stride, which rows trained on other positions cannot be
compared by).
Each run's output goes to WORKDIR/<name>/train.log and is echoed here with the run's name in
front. Rerunning the same sweep resumes unfinished runs and re-tabulates finished ones (chartx.main
resumes from a workdir's newest checkpoint). Compare the learning curves with
`python -m chartx.plot WORKDIR`.
"""

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from chartx import errors, files, metrics, progress, run_config
from chartx.errors import UserError

def parse_grid(spec: str) -> tuple[str, list[str]]:
  """'loss.multiple_targets=1,2' -> ('loss.multiple_targets', ['1', '2']).

  Commas inside brackets or parentheses belong to a value: 'mesh.shape=(-1,1,1),(2,2,1)'.
  """
  key, sep, values = spec.partition("=")
  key = key.strip().removeprefix("--config.")
  if not sep or not key or not values:
    raise UserError(f"--grid {spec!r}: expected KEY=VALUE1,VALUE2,...")
  items, depth, current = [], 0, ""
  for char in values:
    depth += char in "([{"
    depth -= char in ")]}"
    if char == "," and depth == 0:
      items.append(current)
      current = ""
    else:
      current += char
  items.append(current)
  if any(not item.strip() for item in items):
    raise UserError(f"--grid {spec!r}: empty value")
  return key, [item.strip() for item in items]


def load_sweep_file(path: str) -> dict[str, dict[str, Any]]:
  """The named runs of a sweep file's get_sweep()."""
  if not os.path.isfile(path):
    raise UserError(f"--sweep={path}: no such file")
  spec = importlib.util.spec_from_file_location("chartx_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"--sweep={path}: defines no get_sweep()")
  runs = module.get_sweep()
  if isinstance(runs, dict):
    named = runs
  elif isinstance(runs, (list, tuple)):
    named = {run_name(run): run for run in runs}
  else:
    raise UserError(f"--sweep={path}: get_sweep() must return a dict or a list, got {type(runs).__name__}")
  for name, run in named.items():
    if not isinstance(run, dict):
      raise UserError(f"--sweep={path}: run {name!r} is not a dict of config overrides")
  return {name: {k.removeprefix("--config."): v for k, v in run.items()} for name, run in named.items()}


def run_name(overrides: dict[str, Any]) -> str:
  """A directory name for a run: 'loss.multiple_targets=1,model.num_layers=2'."""
  return ",".join(f"{k}={v}" for k, v in overrides.items()).replace("/", "_").replace(" ", "")


def expand(base: dict[str, dict[str, Any]] | None,
           grid: Sequence[tuple[str, list[str]]]) -> dict[str, dict[str, Any]]:
  """{name: overrides}: every named base run (if any) combined with every point of the grid."""
  points = [dict(zip([k for k, _ in grid], values)) for values in itertools.product(*[v for _, v in grid])]
  if base is None:
    return {run_name(point): point for point in points}
  return {",".join(filter(None, [name, run_name(point)])): {**overrides, **point}
          for (name, overrides), point in itertools.product(base.items(), points)}


def check_keys(config_path: str, runs: dict[str, dict[str, Any]]) -> None:
  """Every overridden key exists in the config file's get_config(); else UserError naming it."""
  if not os.path.isfile(config_path):
    raise UserError(f"--config={config_path}: no such file")
  spec = importlib.util.spec_from_file_location("chartx_sweep_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for name, overrides in runs.items():
    for key in overrides:
      if run_config.find_key(config, key) is None:
        raise UserError(f"run {name}: no config key {key!r} in {config_path}")


def command(config_path: str, workdir: str, overrides: dict[str, Any], extra: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "chartx.main", f"--config={config_path}", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in overrides.items()], *extra]


def run_one(name: str, cmd: list[str], workdir: str, echo: bool) -> tuple[int, str]:
  """Runs cmd with its output in workdir/train.log (echoed with the run's name in front).

  Returns (exit status, last line of output). A URL workdir's log (gs://) cannot be appended to:
  it is written once the run ends."""
  log_path, remote = os.path.join(workdir, "train.log"), files.is_remote(workdir)
  lines, last = [], ""
  with contextlib.ExitStack() as stack:
    if not remote:
      os.makedirs(workdir, exist_ok=True)
      log = stack.enter_context(open(log_path, "a", encoding="utf-8"))
    process = stack.enter_context(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True, bufsize=1))
    for line in process.stdout:
      if remote:
        lines.append(line)
      else:
        log.write(line)
        log.flush()
      if line.strip():
        last = line.strip()
        if echo:
          print(f"  [{name}] {line.rstrip()}", file=sys.stderr, flush=True)
  if remote:
    files.write_text(log_path, (files.read_text(log_path) or "") + "".join(lines))
  return process.returncode, last


def summarize(workdir: str) -> dict[str, Any]:
  """The last step, train bpc, each logged *_bpc (validation, eval) and elapsed time of a run."""
  try:
    records = metrics.read_metrics(workdir)
  except UserError:
    return {}
  summary: dict[str, Any] = {}
  for record in records:
    if "bpc" in record:
      summary["step"], summary["train bpc"] = record["step"], record["bpc"]
    for key, value in record.items():
      if key.endswith("_bpc"):
        summary[key.replace("_", " ")] = value
    summary["elapsed"] = record.get("elapsed", summary.get("elapsed"))
  return summary


def table(rows: list[dict[str, Any]]) -> str:
  """A markdown table: run, overrides, status, step, train bpc, each other bpc column, time."""
  bpc_columns = []
  for row in rows:
    bpc_columns += [k for k in row["summary"] if k.endswith(" bpc") and k != "train bpc" and k not in bpc_columns]
  header = ["run", "overrides", "status", "step", "train bpc", *bpc_columns, "time"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    s = row["summary"]
    overrides = " ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "-"
    cells = [row["name"], overrides, row["status"], str(s.get("step", "-")),
             *[f"{s[k]:.4f}" if k in s else "-" for k in ["train bpc", *bpc_columns]],
             progress.format_duration(s["elapsed"]) if s.get("elapsed") is not None else "-"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m chartx.sweep",
                                   description="Run a grid of chartx config overrides and tabulate "
                                               "their final bpc. Other --config.KEY=VALUE flags go "
                                               "to every run.")
  parser.add_argument("--config", required=True, help="config file, as chartx.main takes it")
  parser.add_argument("--workdir", required=True, help="root directory; each run gets a subdirectory")
  parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                      help="one axis of the grid (repeatable)")
  parser.add_argument("--sweep", help="Python file with get_sweep() returning the runs")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output")
  args, extra = parser.parse_known_args(argv)
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (runs take --config.KEY=VALUE)")
  return errors.status_of(_sweep, args, extra)


def _sweep(args: argparse.Namespace, extra: list[str]) -> int:
  if not (args.sweep or args.grid):
    raise UserError("nothing to sweep: give --grid KEY=V1,V2,... or --sweep")
  base = load_sweep_file(args.sweep) if args.sweep else None
  runs = expand(base, [parse_grid(spec) for spec in args.grid])
  check_keys(args.config, runs)
  print(f"sweep: {len(runs)} runs of {args.config} in {args.workdir}", file=sys.stderr, flush=True)
  rows = []
  for i, (name, overrides) in enumerate(runs.items(), 1):
    workdir = os.path.join(args.workdir, name)
    cmd = command(args.config, workdir, overrides, extra)
    if args.dry_run:
      print(" ".join(cmd))
      continue
    print(f"[{i}/{len(runs)}] {name}", file=sys.stderr, flush=True)
    start = time.monotonic()
    status, last = run_one(name, cmd, workdir, echo=not args.quiet)
    seconds = time.monotonic() - start
    summary = summarize(workdir)
    if status:
      print(f"[{i}/{len(runs)}] {name}: FAILED (exit {status}): {last}", file=sys.stderr, flush=True)
    else:
      print(f"[{i}/{len(runs)}] {name}: done in {progress.format_duration(seconds)}", file=sys.stderr,
            flush=True)
    rows.append({"name": name, "overrides": overrides, "workdir": workdir,
                 "status": "ok" if not status else f"failed ({status})", "summary": summary})
  if args.dry_run:
    return 0
  text = table(rows)
  files.write_text(os.path.join(args.workdir, "sweep.md"), text + "\n")
  files.write_text(os.path.join(args.workdir, "sweep.json"), json.dumps(rows, indent=2, default=str) + "\n")
  print(text)
  print(f"sweep: table in {os.path.join(args.workdir, 'sweep.md')}; learning curves: "
        f"python -m chartx.plot {args.workdir}", file=sys.stderr)
  return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
