"""Time to bpc: chartx's training loop against a plain PyTorch GPT loop, same data, same wall clock.

    python -m benchmarks.time_to_bpc --budget_s=420 --repeats=3 --out=/tmp/time_to_bpc
    python -m benchmarks.time_to_bpc --budget_s=300 --config.loss.multiple_targets=2   # a variant
    python -m benchmarks.time_to_bpc --schedule=pinned   # side by side, one core each

Both train on the top-level modules of Python's standard library (configs/small.py's data.path,
split 90/5/5 by chartx's text_files loader) at configs/small.py's dims and optimizer settings:
chartx with `python -m chartx.main --config=configs/small.py`, the baseline with
benchmarks/torch_gpt.py. --schedule=alternate (the default) runs one side at a time on every
core the process may use, as a user would (chartx one XLA CPU device per core, PyTorch one thread
per core), the side that goes first alternating between repeats; --schedule=pinned runs both at
once, chartx on the first core and PyTorch on the second, one thread each.

Each side's budget counts from the launch of its process: start-up, data loading and chartx's
compilation are inside it. Each side first times a few of its own steps (chartx.bench for
chartx, a short run for PyTorch, scheduled the same way) and sets its cosine schedule's horizon
to the steps that fit the budget after its measured start-up; training ends at the horizon or at
the deadline (chartx gets SIGTERM there: it finishes the step, saves and stops; torch_gpt stops
itself). Then both are scored the same way, off the clock: bits per character of every position
of consecutive windows of seq_len over the whole validation split (chartx's --mode=eval with
eval.stride = seq_len; torch_gpt uses the same windows). Writes OUT/results.jsonl (one line per
repeat) and prints a table.
"""

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("chartx", "torch")
# Enough timed steps that each horizon's estimate is not one noisy step's: 5 were off by -5% to +6%.
CHARTX_CALIBRATION_STEPS = (2, 12)  # (untimed, timed) steps of chartx.bench.
TORCH_CALIBRATION_STEPS = 14


def _config_args(overrides: list[str]) -> list[str]:
  # Scored with every position of consecutive windows: eval.stride = seq_len.
  return ["--config=configs/small.py", *overrides,
          f"--config.eval.stride={_config_value(overrides, 'data.seq_len')}"]


def _run(cmd: list[str], cores: set[int], log: str) -> subprocess.Popen:
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=lambda: os.sched_setaffinity(0, cores),
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
  proc.log = log
  return proc


def _last_json(log: str) -> dict:
  with open(log, encoding="utf-8") as f:
    lines = [line for line in f if line.startswith("{")]
  if not lines:
    raise RuntimeError(f"no result in {log}: {open(log, encoding='utf-8').read()[-2000:]}")
  return json.loads(lines[-1])


def _wait(proc: subprocess.Popen, log: str, terminated: bool = False) -> None:
  """Raises if proc failed. terminated: we sent it SIGTERM, and dying by it is not a failure: the
  signal came after its loop had stopped listening (training done, its checkpoint written), and
  the scoring that follows fails loudly if no checkpoint is there."""
  if proc.wait() not in ((0, -signal.SIGTERM) if terminated else (0,)):
    raise RuntimeError(f"{' '.join(proc.args[:4])}... failed ({proc.returncode}); see {log}")


def _waves(args: argparse.Namespace, index: int) -> list[dict[str, set[int]]]:
  """Which side runs on which cores, wave by wave: both at once (pinned), or one after the other
  on every core, the first side alternating with the repeat."""
  cores = sorted(os.sched_getaffinity(0))
  if args.schedule == "pinned":
    return [{"chartx": {cores[0]}, "torch": {cores[1]}}]
  order = SIDES if index % 2 == 0 else SIDES[::-1]
  return [{side: set(cores)} for side in order]


def _calibrate(side: str, cores: set[int], overrides: list[str], run_dir: str) -> subprocess.Popen:
  log = os.path.join(run_dir, f"{side}_calibration.log")
  if side == "chartx":
    warmup, steps = CHARTX_CALIBRATION_STEPS
    cmd = ["-m", "chartx.bench", *_config_args(overrides), f"--steps={steps}", f"--warmup={warmup}"]
  else:
    cmd = ["-m", "benchmarks.torch_gpt", f"--data={_data_path(overrides)}", "--budget_s=1e9",
           f"--num_steps={TORCH_CALIBRATION_STEPS}", "--no_eval", f"--threads={len(cores)}",
           *_torch_dims(overrides), f"--out={os.path.join(run_dir, 'torch_calibration.json')}"]
  return _run([sys.executable, *cmd], cores, log)


def _train(side: str, cores: set[int], overrides: list[str], run_dir: str, horizon: int,
           deadline: float) -> subprocess.Popen:
  log = os.path.join(run_dir, f"{side}_train.log")
  if side == "chartx":
    cmd = ["-m", "chartx.main", *_config_args(overrides), f"--workdir={os.path.join(run_dir, 'chartx')}",
           f"--config.train.num_steps={horizon}", "--config.train.eval_every=0",
           f"--config.train.checkpoint_every={horizon}", "--config.checkpoint.resume=False"]
  else:
    cmd = ["-m", "benchmarks.torch_gpt", f"--data={_data_path(overrides)}", f"--deadline_unix={deadline}",
           f"--num_steps={horizon}", f"--threads={len(cores)}", *_torch_dims(overrides),
           f"--out={os.path.join(run_dir, 'torch.json')}"]
  return _run([sys.executable, *cmd], cores, log)


def _run_wave(start_one, wave: dict[str, set[int]],
              deadline_s: float | None = None) -> dict[str, tuple[float, float]]:
  """Starts every side of the wave, SIGTERMs chartx at its deadline (launch + deadline_s), waits
  for all; returns each side's launch time and the seconds its process ran."""
  launched = {side: time.time() for side in wave}
  procs = {side: start_one(side, cores, launched[side]) for side, cores in wave.items()}
  ran_s, terminated = {}, set()
  while len(ran_s) < len(procs):
    for side, proc in procs.items():
      if side in ran_s:
        continue
      if proc.poll() is not None:
        _wait(proc, proc.log, terminated=side in terminated)
        ran_s[side] = time.time() - launched[side]
      elif side == "chartx" and deadline_s is not None and time.time() > launched[side] + deadline_s:
        proc.send_signal(signal.SIGTERM)  # Finishes the step, saves it, exits 0.
        terminated.add(side)
        deadline_s = None
    time.sleep(0.5)
  return {side: (launched[side], ran_s[side]) for side in wave}


def one_repeat(args: argparse.Namespace, overrides: list[str], out: str, index: int) -> dict:
  run_dir = os.path.join(out, f"repeat_{index}")
  os.makedirs(run_dir, exist_ok=True)
  waves = _waves(args, index)
  # Calibration, scheduled as training will be: each side's step time and start-up on its cores.
  ran = {}
  for wave in waves:
    ran.update(_run_wave(lambda side, cores, _: _calibrate(side, cores, overrides, run_dir), wave))
  chartx_cal = _last_json(os.path.join(run_dir, "chartx_calibration.log"))
  with open(os.path.join(run_dir, "torch_calibration.json"), encoding="utf-8") as f:
    torch_cal = json.load(f)
  step_s = {"chartx": chartx_cal["step_time_s"], "torch": torch_cal["step_time_s"]}
  calibration_steps = {"chartx": sum(CHARTX_CALIBRATION_STEPS), "torch": TORCH_CALIBRATION_STEPS}
  startup_s = {side: max(ran[side][1] - calibration_steps[side] * step_s[side], 0.0) for side in SIDES}
  horizon = {side: max(int((args.budget_s - startup_s[side]) / step_s[side]), 1) for side in SIDES}

  train_s, launched = {}, {}
  for wave in waves:
    def start(side, cores, launched):
      return _train(side, cores, overrides, run_dir, horizon[side], launched + args.budget_s)
    done = _run_wave(start, wave, deadline_s=args.budget_s)
    launched.update({side: start_s for side, (start_s, _) in done.items()})
    if "chartx" in done:
      train_s["chartx"] = done["chartx"][1]
      # Scoring is off the clock, after the wave (torch_gpt scores its model in its own process).
      eval_log = os.path.join(run_dir, "chartx_eval.log")
      _wait(_run([sys.executable, "-m", "chartx.main", *_config_args(overrides),
                  f"--workdir={os.path.join(run_dir, 'chartx')}", "--mode=eval", "--config.eval.max_chars=0"],
                 wave["chartx"], eval_log), eval_log)
  with open(os.path.join(run_dir, "chartx", "eval_validation.json"), encoding="utf-8") as f:
    chartx_eval = json.load(f)
  torch_result = _last_json(os.path.join(run_dir, "torch_train.log"))
  train_s["torch"] = torch_result["train_end_unix"] - launched["torch"]
  return {"repeat": index, "schedule": args.schedule, "first": list(waves[0])[0] if len(waves) > 1 else None,
          "budget_s": args.budget_s, "overrides": overrides, "load_avg": os.getloadavg()[0],
          "chartx_calibrated_step_s": step_s["chartx"], "torch_calibrated_step_s": step_s["torch"],
          "chartx_startup_s": startup_s["chartx"], "torch_startup_s": startup_s["torch"],
          "chartx_steps": chartx_eval["step"], "chartx_horizon": horizon["chartx"], "chartx_train_s": train_s["chartx"],
          "chartx_bpc": chartx_eval["bpc"], "chartx_chars": chartx_eval["num_chars"],
          "torch_steps": torch_result["steps"], "torch_horizon": horizon["torch"], "torch_train_s": train_s["torch"],
          "torch_step_time_s": torch_result["step_time_s"], "torch_threads": torch_result["threads"],
          "torch_bpc": torch_result["validation_bpc"], "torch_chars": torch_result["validation_chars"],
          "torch_params": torch_result["params"]}


# torch_gpt's flags and the config keys whose values they take.
_TORCH_FLAGS = {"seq_len": "data.seq_len", "num_layers": "model.num_layers", "d_model": "model.d_model",
                "num_heads": "model.num_heads", "d_ff": "model.d_ff", "batch_size": "train.batch_size",
                "learning_rate": "optimizer.learning_rate", "warmup_steps": "optimizer.warmup_steps",
                "weight_decay": "optimizer.weight_decay", "seed": "seed"}


@functools.lru_cache(maxsize=1)
def _small_config():
  sys.path.insert(0, ROOT)
  from configs import small  # pylint: disable=import-outside-toplevel
  return small.get_config()


def _config_value(overrides: list[str], key: str) -> str:
  """The value of config key `key`: its --config override, else configs/small.py's."""
  for arg in overrides:
    if arg.startswith(f"--config.{key}="):
      return arg.split("=", 1)[1]
  value = _small_config()
  for part in key.split("."):
    value = value[part]
  return str(value)


def _data_path(overrides: list[str]) -> str:
  return _config_value(overrides, "data.path")


def _torch_dims(overrides: list[str]) -> list[str]:
  """The same dims and optimizer settings for the PyTorch GPT as chartx runs with."""
  return [f"--{flag}={_config_value(overrides, key)}" for flag, key in _TORCH_FLAGS.items()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget_s", type=float, default=600.0, help="training seconds for each side")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--schedule", choices=("alternate", "pinned"), default="alternate",
                      help="one side at a time on every core, or both at once on one core each")
  parser.add_argument("--out", default="/tmp/time_to_bpc")
  args, overrides = parser.parse_known_args()
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad or args.budget_s <= 0 or args.repeats < 1:
    print(f"error: {'unknown argument ' + bad[0] if bad else '--budget_s and --repeats must be positive'}",
          file=sys.stderr)
    sys.exit(1)
  if args.schedule == "pinned" and len(os.sched_getaffinity(0)) < 2:
    print("error: --schedule=pinned needs 2 CPU cores (one for each side)", file=sys.stderr)
    sys.exit(1)
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for index in range(args.repeats):
    row = one_repeat(args, overrides, args.out, index)
    rows.append(row)
    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
  print(f"\n| repeat | first | chartx steps | chartx bpc | torch steps | torch bpc |\n|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['repeat']} | {row['first'] or 'both'} | {row['chartx_steps']} | {row['chartx_bpc']:.4f} | "
          f"{row['torch_steps']} | {row['torch_bpc']:.4f} |")
  if len(rows) > 1:
    print(f"median: chartx {statistics.median(r['chartx_bpc'] for r in rows):.4f}, "
          f"torch {statistics.median(r['torch_bpc'] for r in rows):.4f}")


if __name__ == "__main__":
  main()
