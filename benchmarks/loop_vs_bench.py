"""The training loop's speed against the bare train step's: python -m chartx.main vs chartx.bench.

    python -m benchmarks.loop_vs_bench --repeats=3 [--config=configs/small.py] [--config.KEY=V ...]

For one core (pinned to CPU 0) and for all cores, alternately, `repeats` times: chartx.bench's
median step on synthetic windows, and `python -m chartx.main` training `--steps` steps on the
config's real data (validation and checkpoints off), whose chars_per_sec records in
metrics.jsonl already leave out compilation. Prints one JSON line per pair and the loop's
throughput over the bench's: 1.0 means the loop adds nothing to the step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], cores: set[int]) -> str:
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        preexec_fn=lambda: os.sched_setaffinity(0, cores))
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd[:4])} failed: {proc.stderr[-2000:]}")
  return proc.stdout


def one_pair(args: argparse.Namespace, overrides: list[str], cores: set[int]) -> dict:
  py = sys.executable
  config = [f"--config={args.config}", *overrides]
  bench = json.loads(_run([py, "-m", "chartx.bench", *config, f"--steps={args.steps}", "--warmup=3"],
                          cores).splitlines()[-1])
  with tempfile.TemporaryDirectory() as workdir:
    _run([py, "-m", "chartx.main", *config, f"--workdir={workdir}", f"--config.train.num_steps={args.steps + 1}",
          f"--config.train.log_every={args.log_every}", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=0"], cores)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
  loop = [r["chars_per_sec"] for r in records if "chars_per_sec" in r]
  return {"cores": len(cores), "bench_chars_per_sec": bench["chars_per_sec"],
          "loop_chars_per_sec": statistics.median(loop), "loop_records": loop,
          "loop_over_bench": statistics.median(loop) / bench["chars_per_sec"],
          "load_avg": os.getloadavg()[0]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/small.py")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=30, help="timed steps of each side")
  parser.add_argument("--log_every", type=int, default=10)
  args, overrides = parser.parse_known_args()
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad or args.repeats < 1 or args.steps < args.log_every:
    print(f"error: {'unknown argument ' + bad[0] if bad else '--repeats >= 1 and --steps >= --log_every'}",
          file=sys.stderr)
    sys.exit(1)
  all_cores = os.sched_getaffinity(0)
  ratios = {1: [], len(all_cores): []}
  for _ in range(args.repeats):
    for cores in ({min(all_cores)}, all_cores):
      row = one_pair(args, overrides, cores)
      ratios[len(cores)].append(row["loop_over_bench"])
      print(json.dumps(row), flush=True)
  for n, values in ratios.items():
    print(f"{n} core{'s' if n > 1 else ''}: loop/bench chars/s {', '.join(f'{v:.3f}' for v in values)}")


if __name__ == "__main__":
  main()
