"""python -m chartx.reproduce: the paper's ablation and the recipe's other choices, trained and
scored the same way on this machine, as one markdown table and one PNG of the curves.

    python -m chartx.reproduce --out=/tmp/chartx_reproduce [--rows=full,momentum] [--seeds=0,1] [--steps=N]

Every row trains configs/reproduce.py's deep, narrow model (the full recipe) on the Python
standard library's sources with one change, for the same steps and with the same seeds, then
scores its last checkpoint with one protocol: the last layer's next-character prediction, each
scored character with the full data.seq_len context before it (stride 1, the paper's protocol),
on the first --eval_chars characters of the validation split (all but the first data.seq_len,
which have less context before them). Each run's OUT/<row>/seed<s>/reproduce.json names that
protocol (split, stride, context, characters); OUT/reproduce.md has the table, OUT/reproduce.json
every result, OUT/curves.png the training curves (chartx.plot; their validation points are the
config's cheaper strided eval.stride, not the table's protocol).

The xl row is the second family against the first: Transformer-XL (the same depth and width, a
memory of 64) trained for as long as the full row, not for as many steps. Before anything trains,
a step of each is timed back to back on this machine (chartx.tools.bench; OUT/step_times.json
keeps the two times, so that a rerun or another seed trains the same steps), and xl trains
steps x (full's step time / xl's). It is scored on the same characters by its own protocol: the
text read as one stream in segments of data.seq_len, each with the memory that the text before it
left (model.mem_len), so that every scored character sees at least min(mem_len, seq_len) + 1 and
at most mem_len + seq_len characters; the summary states both protocols.

  --rows=A,B      the rows to run, in the table's order (default: all; --list prints them).
  --seeds=0,1     seeds; every row trains once per seed (default 0).
  --steps=N       training steps of every run (default: the config's train.num_steps).
  --eval_chars=N  a prefix of the validation split to score (default 4096; --tiny: 64).
  --eval_stride=S the protocol's stride (default 1; a larger one trades context for speed).
  --out=DIR       where the runs, the table and the PNG go.
  --tiny          configs/tiny.py's model and data, a few steps: a smoke test in seconds.
  --config.KEY=V  an override for every row (for example --config.model.num_layers=32).

A finished run (its reproduce.json exists) is not run again, so a rerun resumes, and runs with
other --rows or --seeds into the same OUT join the table. An unknown row, a row that cannot run
on the config's model family, or a bad key of any row's config is a one-line error before
anything trains.
"""

import argparse
import ast
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import ml_collections

from chartx import config as config_lib
from chartx import data, errors, evaluate, files, inference, loop, progress, run_config
from chartx.errors import UserError
from chartx.families import registry
from chartx.families.base import Recurrent

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Row:
  change: str  # What differs from the full recipe, for the table.
  overrides: dict[str, Any]
  # The model families (model.family of the config it changes) the row can run on; None: any. A
  # row about learned absolute positions means nothing for a family with relative positions.
  families: tuple[str, ...] | None = None
  # A row whose training time this one gets instead of its steps: the steps scaled by the two
  # rows' step times, timed back to back before training (step_times); None: the same steps.
  time_of: str | None = None


ROWS: dict[str, Row] = {
    "full": Row("- (the full recipe)", {}),
    "no_multiple_positions": Row("no multiple positions: only the last position's loss",
                                 {"loss.multiple_positions": False}),
    "no_intermediate_layers": Row("no intermediate layers: only the last layer's loss",
                                  {"loss.intermediate_layers": False}),
    "no_multiple_targets": Row("no multiple targets: next character only",
                               {"loss.multiple_targets": 1}),
    "momentum": Row("the paper's optimizer as published: momentum 0.99, lr 0.003, no warm-up, no clipping",
                    {"optimizer.name": "momentum", "optimizer.momentum": 0.99, "optimizer.learning_rate": 0.003,
                     "optimizer.warmup_steps": 0, "optimizer.grad_clip": 0.0}),
    "sinusoid_positions": Row("one fixed sinusoid at the input, not a learned table per layer",
                              {"model.positions": "sinusoid"}, families=("fixed",)),
    "mean_layer_losses": Row("layer losses averaged over the active layers, not summed",
                             {"loss.layer_reduction": "mean"}),
    # eval.stride is the sliding window's; XL's validation points are recurrent.
    "xl": Row("Transformer-XL (relative positions, a memory of 64) for full's training time",
              {"model.family": "xl", "model.mem_len": 64, "eval.stride": 0}, families=("fixed",),
              time_of="full"),
}
PROTOCOL_FILE = "reproduce.json"
STEP_TIMES_FILE = "step_times.json"


def parse_override(spec: str) -> tuple[str, Any]:
  """'--config.model.num_layers=32' -> ('model.num_layers', 32); a value that is not a Python
  literal is a string."""
  key, sep, value = spec.removeprefix("--config.").partition("=")
  if not sep or not key:
    raise UserError(f"{spec!r}: expected --config.KEY=VALUE")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str) -> None:
  """Sets each dotted key (it must exist) to its value, converted to the key's type."""
  for key, value in overrides.items():
    found = run_config.find_key(config, key)
    if found is None:
      raise UserError(f"{where}: no config key {key!r}")
    node, leaf = found
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)  # --config.optimizer.grad_clip=1 means 1.0.
    try:
      node[leaf] = value
    except TypeError:
      raise UserError(f"{where}: {key}={value!r} is not a {type(old).__name__}") from None


def base_config(tiny: bool) -> ml_collections.ConfigDict:
  """configs/reproduce.py's full recipe; tiny: with configs/tiny.py's model and data."""
  sys.path.insert(0, _ROOT)  # configs/ is a package at the repository root.
  try:
    from configs import reproduce, tiny as tiny_configs  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(_ROOT)
  config = reproduce.get_config()
  if tiny:
    small = tiny_configs.get_config()
    config.data.path, config.data.seq_len = small.data.path, small.data.seq_len
    for key in ("num_layers", "d_model", "num_heads", "d_ff", "max_len"):
      config.model[key] = small.model[key]
    config.train.update(batch_size=4, num_steps=4, log_every=2)
    config.eval.update(max_chars=256, stride=small.eval.stride, batch_size=8)
  return config


def run_configs(base: ml_collections.ConfigDict, rows: Sequence[str], seeds: Sequence[int],
                steps: int) -> dict[tuple[str, int], ml_collections.ConfigDict]:
  """{(row, seed): its training config}, each checked by every section's owner."""
  runs = {}
  # Seed by seed, so a run cut short has every row of the first seed.
  for seed in seeds:
    for name in rows:
      row = ROWS[name]
      if row.families is not None and base.model.family not in row.families:
        raise UserError(f"row {name} cannot run on model.family={base.model.family} "
                        f"(it runs on {', '.join(row.families)})")
      config = ml_collections.ConfigDict(base.to_dict())
      apply(config, row.overrides, f"row {name}")
      config.seed = seed
      set_steps(config, steps)
      try:
        config_lib.check(config)
      except UserError as e:
        raise UserError(f"row {name}: {e}") from None
      runs[name, seed] = config
  return runs


def set_steps(config: ml_collections.ConfigDict, steps: int) -> None:
  """Four validation points for the curves; one checkpoint, at the end, for the protocol."""
  config.train.update(num_steps=steps, eval_every=max(1, steps // 4), checkpoint_every=steps,
                      keep_checkpoints=1)


def measure_step_time(config: ml_collections.ConfigDict, steps: int) -> float:
  """Median seconds of one training step of config on this machine (chartx.tools.bench: the
  compiled train step on random windows, after one warm-up step)."""
  from chartx.tools import bench  # pylint: disable=import-outside-toplevel
  return bench.benchmark(config, steps=steps, warmup=1)["step_time_s"]


def step_times(out: str, base: ml_collections.ConfigDict, names: Sequence[str], steps: int,
               timed_steps: int) -> dict[str, dict[str, Any]]:
  """{row: its budget} for each row of `names` that trains for another row's time: that row, its
  steps, both rows' seconds per step, and trained_steps = steps x (its step time / this row's).
  The two are timed back to back the first time (timed_steps each) and kept in
  OUT/step_times.json, so that a rerun, a resumed run or another seed trains the same steps."""
  path = os.path.join(out, STEP_TIMES_FILE)
  seconds: dict[str, float] = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      seconds = json.load(f)["seconds_per_step"]
  budgets = {}
  for name in names:
    ref = ROWS[name].time_of
    if ref is None:
      continue
    if name not in seconds or ref not in seconds:
      configs = run_configs(base, [ref, name], [base.seed], steps)
      for timed in (ref, name):
        print(f"reproduce: timing {timed_steps} training steps of {timed}", file=sys.stderr, flush=True)
        seconds[timed] = measure_step_time(configs[timed, base.seed], timed_steps)
      files.write_text(path, json.dumps({"seconds_per_step": seconds, "timed_steps": timed_steps,
                                         "load_average": os.getloadavg()}, indent=2) + "\n")
    budgets[name] = {"row": ref, "steps": steps, "seconds_per_step": {ref: seconds[ref], name: seconds[name]},
                     "trained_steps": max(1, round(steps * seconds[ref] / seconds[name]))}
  return budgets


def run_dir(out: str, name: str, seed: int) -> str:
  return os.path.join(out, name, f"seed{seed}")


def score(config: ml_collections.ConfigDict, workdir: str, eval_chars: int, stride: int) -> dict[str, Any]:
  """The protocol: the last checkpoint's last-layer next-character bpc on the first eval_chars
  characters of the validation split, by its family's protocol, the first window (or segment)
  of T = data.seq_len targets taken out.

  Sliding windows (the fixed family): windows of T sliding by `stride`, so that every counted
  character has at least T - stride + 1 characters before it. scoring.evaluate_bits also scores
  the first window's targets with the 1..T characters they have; a row trained on the last
  position alone (no multiple positions) never learned to predict from those, so they are taken
  out: they are exactly what evaluating the first T + 1 characters alone scores.
  Recurrent (Transformer-XL): the text as one stream in segments of T, each with the memory that
  the text before it left; the first segment (no memory) is taken out the same way, so the same
  characters count, each seeing at least min(mem_len, T) + 1 characters."""
  proto = registry.get(config.model.family).protocol(config)
  corpus = data.load_corpus(config.data)
  ids_M = data.eval_stream(corpus, "validation")[:eval_chars]
  seq_len = proto.seq_len
  if len(ids_M) <= seq_len + 1:
    raise UserError(f"--eval_chars={eval_chars} must exceed data.seq_len + 1 = {seq_len + 1}")
  restored = inference.restore(config, workdir, corpus.vocab.size)
  recurrent = isinstance(proto, Recurrent)
  # One stream: every segment after the first has the memory of all the text before it.
  evaluator = evaluate.Evaluator(restored.model, proto, restored.mesh, restored.rules,
                                 1 if recurrent else config.eval.batch_size)
  start = time.time()
  bits, count = evaluator(restored.params, ids_M, stride=stride)
  short_bits, short_count = evaluator(restored.params, ids_M[:seq_len + 1], stride=stride)
  counted = {"max_chars": eval_chars, "num_chars": count - short_count, "layer": "last",
             "target": "next character"}
  if recurrent:
    fields = proto.describe(len(ids_M), 1)
    # The second segment's memory holds min(mem_len, T) positions: its first character sees those and itself.
    protocol = {"split": "validation", "protocol": fields["protocol"],
                **{key: fields[key] for key in ("seq_len", "mem_len", "clamp_len", "same_length", "streams")},
                "context": fields["attention_length"], "min_context": min(proto.mem_len, seq_len) + 1,
                **counted}
  else:
    protocol = {"split": "validation", "stride": stride, "context": seq_len,
                "min_context": seq_len - stride + 1, **counted}
  return {"step": restored.step, "bpc": (bits - short_bits) / (count - short_count), "protocol": protocol,
          "eval_seconds": round(time.time() - start, 1)}


def how(protocol: dict[str, Any]) -> str:
  """A protocol in a few words, for a run's line."""
  if protocol.get("protocol") == "recurrent":
    return f"recurrent: segments of {protocol['seq_len']}, memory {protocol['mem_len']}"
  return f"stride {protocol['stride']}, context {protocol['context']}"


def train_and_score(name: str, seed: int, config: ml_collections.ConfigDict, workdir: str,
                    eval_chars: int, eval_stride: int, budget: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains one run, scores its last checkpoint with the protocol, writes its reproduce.json.
  budget: the training time it was given (step_times), for the record."""
  start = time.time()
  state = loop.train_and_evaluate(config, workdir)
  train_seconds = time.time() - start
  if int(state.step) != config.train.num_steps:  # A SIGTERM or Ctrl-C stopped it: rerun to resume.
    raise UserError(f"row {name} seed {seed} stopped at step {int(state.step)} of {config.train.num_steps}")
  result = score(config, workdir, eval_chars, eval_stride)
  record = {"row": name, "change": ROWS[name].change, "overrides": ROWS[name].overrides, "seed": seed,
            "steps": result["step"], "bpc": result["bpc"], "protocol": result["protocol"],
            "train_seconds": round(train_seconds, 1), "eval_seconds": result["eval_seconds"]}
  if budget is not None:
    record["time_of"] = budget
  files.write_text(os.path.join(workdir, PROTOCOL_FILE), json.dumps(record, indent=2) + "\n")
  print(f"{name} seed {seed}: step {result['step']}: bpc {result['bpc']:.4f} over "
        f"{result['protocol']['num_chars']:,} validation characters ({how(result['protocol'])})", flush=True)
  return record


def collect(out: str) -> list[dict[str, Any]]:
  """Every finished run's record under out, in the table's row order, then by seed."""
  records = []
  for name in ROWS:
    row_dir = os.path.join(out, name)
    if not os.path.isdir(row_dir):
      continue
    for entry in sorted(os.listdir(row_dir)):
      path = os.path.join(row_dir, entry, PROTOCOL_FILE)
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          records.append(json.load(f))
  return sorted(records, key=lambda r: (list(ROWS).index(r["row"]), r["seed"]))


def table(records: Sequence[dict[str, Any]]) -> str:
  """The markdown table: one line per row, every seed's bpc, their mean, the difference to full."""
  by_row: dict[str, list[dict[str, Any]]] = {}
  for record in records:
    by_row.setdefault(record["row"], []).append(record)
  mean = lambda rs: sum(r["bpc"] for r in rs) / len(rs)
  full = mean(by_row["full"]) if "full" in by_row else None
  lines = ["| row | change from the full recipe | seeds | validation bpc per seed | mean | vs full | train time per run |",
           "|---|---|---|---|---|---|---|"]
  for name, rs in by_row.items():
    diff = "-" if full is None or name == "full" else f"{mean(rs) - full:+.3f}"
    train_time = progress.format_duration(sum(r["train_seconds"] for r in rs) / len(rs))
    lines.append(f"| {name} | {rs[0]['change']} | {', '.join(str(r['seed']) for r in rs)} | "
                 f"{', '.join(format(r['bpc'], '.3f') for r in rs)} | {mean(rs):.3f} | {diff} | {train_time} |")
  return "\n".join(lines)


def protocol_lines(records: Sequence[dict[str, Any]]) -> str:
  """How the records were trained and scored, as sentences: one for the rows trained for the same
  steps, one for each row trained for another's time (UserError where runs that should agree differ)."""
  groups: dict[str | None, list[dict[str, Any]]] = {}
  for record in records:
    groups.setdefault(None if ROWS[record["row"]].time_of is None else record["row"], []).append(record)
  lines = []
  for name, group in groups.items():
    protocols = {json.dumps(r["protocol"], sort_keys=True) for r in group}
    steps = {r["steps"] for r in group}
    if len(protocols) > 1 or len(steps) > 1:
      runs = "runs" if name is None else f"runs of row {name}"
      raise UserError(f"the {runs} in this --out were trained or scored differently (steps "
                      f"{sorted(steps)}; {len(protocols)} protocols): use a new --out")
    p = group[0]["protocol"]
    if name is None:
      lines.append(f"{group[0]['steps']:,} steps per run; bpc of the last layer's next-character prediction "
                   f"on {p['num_chars']:,} characters of the {p['split']} split (those of its first "
                   f"{p['max_chars']:,} with a full context), stride {p['stride']}, context {p['context']}: "
                   f"every scored character sees at least {p['min_context']} before it.")
      continue
    budget = group[0]["time_of"]
    ref, seconds = budget["row"], budget["seconds_per_step"]
    line = (f"Row {name}: trained for the time of {ref}'s {budget['steps']:,} steps, {group[0]['steps']:,} "
            f"steps ({seconds[name]:.3f} s a step against {seconds[ref]:.3f} s, timed back to back before "
            f"training); bpc of the last layer's next-character prediction on {p['num_chars']:,} "
            f"characters of the {p['split']} split")
    if p.get("protocol") == "recurrent":
      line += (f" (its first {p['max_chars']:,} but the first segment), read recurrently as one stream in "
               f"segments of {p['seq_len']} with a memory of {p['mem_len']} (clamp_len {p['clamp_len']}, "
               f"same_length {p['same_length']}): every scored character sees {p['min_context']} to "
               f"{p['context']} characters before it.")
    else:
      line += f", stride {p['stride']}, context {p['context']}."
    lines.append(line)
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m chartx.reproduce",
                                   description="Train every row of the ablation table the same way "
                                               "and tabulate their bpc. --config.KEY=VALUE flags "
                                               "go to every row.")
  parser.add_argument("--out", default="/tmp/chartx_reproduce", help="directory of the runs and the table")
  parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
  parser.add_argument("--steps", type=int, help="training steps per run (default: the config's)")
  parser.add_argument("--eval_chars", type=int, help="validation characters scored (default 4096; --tiny 64)")
  parser.add_argument("--eval_stride", type=int, default=1, help="the protocol's stride (default 1)")
  parser.add_argument("--tiny", action="store_true", help="a tiny model for a few steps (tests)")
  parser.add_argument("--list", action="store_true", help="print the rows and exit")
  args, extra = parser.parse_known_args(argv)
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (rows take --config.KEY=VALUE)")
  if args.list:
    for name, row in ROWS.items():
      print(f"{name}: {row.change}")
    return 0
  return errors.status_of(_reproduce, args, extra)


def _reproduce(args: argparse.Namespace, extra: Sequence[str]) -> int:
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = [r for r in rows if r not in ROWS]
  if unknown or not rows:
    raise UserError(f"--rows: unknown row {', '.join(unknown) or '(none given)'}; the rows are "
                    f"{', '.join(ROWS)}")
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    raise UserError(f"--seeds={args.seeds}: expected comma-separated integers") from None
  base = base_config(args.tiny)
  apply(base, dict(parse_override(spec) for spec in extra), "--config")
  steps = args.steps or base.train.num_steps
  eval_chars = args.eval_chars or (64 if args.tiny else 4096)
  if steps < 1 or eval_chars < 2:
    raise UserError(f"--steps={steps} must be >= 1 and --eval_chars={eval_chars} >= 2")
  if not 1 <= args.eval_stride <= base.data.seq_len:
    raise UserError(f"--eval_stride={args.eval_stride} must be in [1, data.seq_len={base.data.seq_len}]")
  runs = run_configs(base, rows, seeds, steps)  # Every row checked before anything trains.
  start, load_start = time.time(), os.getloadavg()
  unfinished = [name for name in rows if any(
      not os.path.exists(os.path.join(run_dir(args.out, name, seed), PROTOCOL_FILE)) for seed in seeds)]
  budgets = step_times(args.out, base, unfinished, steps, timed_steps=3 if args.tiny else 10)
  for (name, _), config in runs.items():
    if name in budgets:
      set_steps(config, budgets[name]["trained_steps"])
  print(f"reproduce: {len(runs)} runs ({len(rows)} rows x {len(seeds)} seeds) of {steps} steps "
        f"into {args.out}", file=sys.stderr, flush=True)
  for i, ((name, seed), config) in enumerate(runs.items(), 1):
    workdir = run_dir(args.out, name, seed)
    if os.path.exists(os.path.join(workdir, PROTOCOL_FILE)):
      print(f"[{i}/{len(runs)}] {name} seed {seed}: done before", file=sys.stderr, flush=True)
      continue
    print(f"[{i}/{len(runs)}] {name} seed {seed}", file=sys.stderr, flush=True)
    record = train_and_score(name, seed, config, workdir, eval_chars, args.eval_stride, budgets.get(name))
    print(f"[{i}/{len(runs)}] {name} seed {seed}: bpc {record['bpc']:.4f} (trained in "
          f"{progress.format_duration(record['train_seconds'])})", file=sys.stderr, flush=True)
  records = collect(args.out)
  text = f"{protocol_lines(records)}\n\n{table(records)}\n"
  files.write_text(os.path.join(args.out, "reproduce.md"), text)
  summary = {"command": " ".join(["python -m chartx.reproduce", *(argv_of(args, extra))]),
             "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
             "seconds": round(time.time() - start, 1), "load_average_start": load_start,
             "load_average_end": os.getloadavg(), "runs": records}
  files.write_text(os.path.join(args.out, "reproduce.json"), json.dumps(summary, indent=2) + "\n")
  print(text)
  try:
    from chartx.tools import plot  # pylint: disable=import-outside-toplevel
    first = {}
    for record in records:  # One curve per row (its first seed), or the plot is unreadable.
      first.setdefault(record["row"], run_dir(args.out, record["row"], record["seed"]))
    png = plot.plot(list(first.values()), os.path.join(args.out, "curves.png"),
                    "chartx.reproduce: " + ", ".join(first))
    print(f"reproduce: table in {os.path.join(args.out, 'reproduce.md')}, curves in {png}", file=sys.stderr)
  except UserError as e:  # matplotlib missing: the table stands without the PNG.
    print(f"reproduce: table in {os.path.join(args.out, 'reproduce.md')}; no PNG: {e}", file=sys.stderr)
  return 0


def argv_of(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
  """The flags this run was given, for the record."""
  flags = [f"--out={args.out}", f"--rows={args.rows}", f"--seeds={args.seeds}"]
  flags += [f"--steps={args.steps}"] if args.steps else []
  flags += [f"--eval_chars={args.eval_chars}"] if args.eval_chars else []
  flags += [f"--eval_stride={args.eval_stride}"] + (["--tiny"] if args.tiny else []) + list(extra)
  return flags


if __name__ == "__main__":
  sys.exit(main())
