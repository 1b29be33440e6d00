"""Quality at equal wall clock on real text: Transformer-XL against the fixed-context model.

    python -m benchmarks.xl_quality --budget_s=600 --out=/tmp/xl_quality
    python -m benchmarks.xl_quality --budget_s=60 --eval_chars=2000 --out=/tmp/xl_quality_smoke

Both train configs/small.py's recipe (6 layers, d_model 256, 8 heads, d_ff 1024, segments or windows
of 256, batch 16, AdamW with cosine decay, no auxiliary losses) on the top-level modules of Python's
standard library (its data.path, split 90/5/5 by chartx's text_files loader): the fixed model with
the paper's learned per-layer positions, Transformer-XL with model.family=xl and a training memory
of 256. They run side by side, python -m chartx.main each, the fixed model pinned to CPU core 0 and
XL to core 1, for --budget_s of wall clock each (start-up and compilation included). Each first
times a few of its own steps (chartx.bench, also side by side) and sets its cosine schedule's
horizon to the steps that fit the budget; training ends there or at the deadline (SIGTERM: the run
saves its step and stops). Then, off the clock, each is scored on the same first --eval_chars
characters of the validation split with its own full-context protocol (--mode=eval): the fixed model
with the paper's sliding window at stride 1 (every character sees 256), XL recurrently in one
stream, segments of 256 with a memory of --xl_eval_mem_len (every character after the first segment
sees more than 256). Writes OUT/results.json and prints a markdown table.
"""

import argparse
import json
import os
import signal
import sys
import time

from benchmarks.time_to_bpc import _last_json, _run, _wait

# configs/small.py as it was when this benchmark was written and run (docs/results.md): the paper's
# learned per-layer positions for the fixed model, no auxiliary losses for either.
_RECIPE = ["--config=configs/small.py", "--config.loss.intermediate_layers=False"]
MODELS = {
    "fixed": [*_RECIPE, "--config.model.positions=per_layer"],
    "xl": [*_RECIPE, "--config.model.family=xl", "--config.model.mem_len=256", "--config.eval.stride=0"],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.xl_quality", description=__doc__.splitlines()[0])
  p.add_argument("--budget_s", type=float, default=600.0, help="Wall-clock seconds of training, each.")
  p.add_argument("--eval_chars", type=int, default=20_000,
                 help="Characters of the validation split both are scored on (its first ones).")
  p.add_argument("--xl_eval_mem_len", type=int, default=1024, help="XL's memory when scored.")
  p.add_argument("--out", required=True, help="A directory for the runs, their logs and results.json.")
  args = p.parse_args(argv)
  if args.budget_s <= 0 or args.eval_chars < 2 or args.xl_eval_mem_len < 0:
    p.error("--budget_s must be > 0, --eval_chars >= 2 and --xl_eval_mem_len >= 0")
  return args


def _eval_args(model: str, args: argparse.Namespace) -> list[str]:
  """Each model's own full-context protocol on the same characters."""
  same = [f"--config.eval.max_chars={args.eval_chars}", "--config.eval.split=validation"]
  if model == "fixed":
    return same + ["--config.eval.stride=1", "--config.eval.batch_size=32"]
  return same + ["--config.eval.seq_len=256", f"--config.eval.mem_len={args.xl_eval_mem_len}",
                 "--config.eval.batch_size=1"]


def run(args: argparse.Namespace) -> dict:
  py = sys.executable
  os.makedirs(args.out, exist_ok=True)
  log = lambda name: os.path.join(args.out, f"{name}.log")
  cores = {"fixed": {0}, "xl": {1}}  # CPU cores (time_to_bpc._run pins each process to its set).
  calibration = {m: _run([py, "-m", "chartx.bench", *MODELS[m], "--steps=4", "--warmup=1"], cores[m],
                         log(f"{m}_calibration")) for m in MODELS}
  for m, proc in calibration.items():
    _wait(proc, log(f"{m}_calibration"))
  bench = {m: _last_json(log(f"{m}_calibration")) for m in MODELS}
  horizon = {m: max(int(args.budget_s / bench[m]["step_time_s"]), 1) for m in MODELS}
  start = time.time()
  train = {m: _run([py, "-m", "chartx.main", *MODELS[m], f"--workdir={os.path.join(args.out, m)}",
                    f"--config.train.num_steps={horizon[m]}", "--config.train.eval_every=0",
                    f"--config.train.checkpoint_every={horizon[m]}", "--config.checkpoint.resume=False"],
                   cores[m], log(f"{m}_train")) for m in MODELS}
  seconds = {}
  while any(p.poll() is None for p in train.values()) and time.time() < start + args.budget_s:
    time.sleep(1)
  for m, proc in train.items():
    terminated = proc.poll() is None
    if terminated:
      proc.send_signal(signal.SIGTERM)  # Finishes the step, saves it, exits 0.
    _wait(proc, log(f"{m}_train"), terminated=terminated)
    seconds[m] = time.time() - start
  scoring = {m: _run([py, "-m", "chartx.main", f"--workdir={os.path.join(args.out, m)}", "--mode=eval",
                      *_eval_args(m, args)], cores[m], log(f"{m}_eval")) for m in MODELS}
  results = {"budget_s": args.budget_s, "eval_chars": args.eval_chars, "load_avg": os.getloadavg()[0],
             "models": {}}
  for m, proc in scoring.items():
    _wait(proc, log(f"{m}_eval"))
    with open(os.path.join(args.out, m, "eval_validation.json"), encoding="utf-8") as f:
      scored = json.load(f)
    results["models"][m] = {"params": bench[m]["params"], "step_time_s": bench[m]["step_time_s"],
                            "horizon": horizon[m], "steps": scored["step"], "train_s": seconds[m],
                            **{k: scored[k] for k in ("bpc", "num_chars", "protocol", "attention_length",
                                                      "seconds")}}
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  return results


def table(results: dict) -> str:
  lines = [f"Each trained for {results['budget_s']:.0f} s of wall clock on one core; scored on the "
           f"first {results['eval_chars']:,} characters of the validation split (load {results['load_avg']:.1f}).",
           "", "| model | parameters | steps | validation bpc | protocol | attention length | scoring time |",
           "|---|---|---|---|---|---|---|"]
  for m, r in results["models"].items():
    lines.append(f"| {m} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['bpc']:.4f} | {r['protocol']} | "
                 f"{r['attention_length']:,} | {r['seconds']:.0f} s |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  print(table(run(parse_args(argv))), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
