"""Time to bpc: chartx's training loop against a plain PyTorch GPT loop, same data, same wall clock.

    python -m benchmarks.time_to_bpc --budget_s=600 --repeats=3 --out=/tmp/time_to_bpc
    python -m benchmarks.time_to_bpc --budget_s=300 --config.loss.multiple_targets=2   # a variant

Both train on the top-level modules of Python's standard library (configs/small.py's data.path,
split 90/5/5 by chartx's text_files loader) at configs/small.py's dims, side by side: chartx
(`python -m chartx.main --config=configs/small.py`) pinned to CPU core 0, benchmarks/torch_gpt.py
pinned to core 1, one thread each, started together. Each first times a few of its own steps
(chartx.bench for chartx, a short run for PyTorch; also side by side) and sets its cosine
schedule's horizon to the steps that fit the budget; training ends at the horizon or at the
deadline (chartx gets SIGTERM there: it saves and stops). Then both are scored the same way,
off the clock: bits per character of every position of consecutive windows of seq_len over the
whole validation split (chartx's --mode=eval with eval.stride = seq_len; torch_gpt uses the same
windows). Writes OUT/results.jsonl (one line per repeat) and prints a table.
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


def _pinned(core: int):
  return lambda: os.sched_setaffinity(0, {core})


def _config_args(overrides: list[str]) -> list[str]:
  # Scored with every position of consecutive windows: eval.stride = seq_len.
  return ["--config=configs/small.py", *overrides,
          f"--config.eval.stride={_config_value(overrides, 'data.seq_len')}"]


def _run(cmd: list[str], core: int, log: str) -> subprocess.Popen:
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=_pinned(core), stdout=open(log, "w"),
                          stderr=subprocess.STDOUT, start_new_session=True)


def _last_json(log: str) -> dict:
  with open(log, encoding="utf-8") as f:
    lines = [line for line in f if line.startswith("{")]
  if not lines:
    raise RuntimeError(f"no result in {log}: {open(log, encoding='utf-8').read()[-2000:]}")
  return json.loads(lines[-1])


def _wait(proc: subprocess.Popen, log: str) -> None:
  if proc.wait() != 0:
    raise RuntimeError(f"{' '.join(proc.args[:4])}... failed ({proc.returncode}); see {log}")


def one_repeat(args: argparse.Namespace, overrides: list[str], out: str, index: int) -> dict:
  py = sys.executable
  data = _data_path(overrides)
  run_dir = os.path.join(out, f"repeat_{index}")
  os.makedirs(run_dir, exist_ok=True)
  # Calibration, side by side: each side's own step time on its core.
  calib = {"chartx": os.path.join(run_dir, "chartx_calibration.log"),
           "torch": os.path.join(run_dir, "torch_calibration.log")}
  procs = [_run([py, "-m", "chartx.bench", *_config_args(overrides), "--steps=5", "--warmup=2"], 0, calib["chartx"]),
           _run([py, "-m", "benchmarks.torch_gpt", f"--data={data}", "--budget_s=1e9", "--num_steps=8",
                 "--no_eval", *_torch_dims(overrides), f"--out={os.path.join(run_dir, 'torch_calibration.json')}"], 1, calib["torch"])]
  for proc, log in zip(procs, calib.values()):
    _wait(proc, log)
  chartx_step_s = _last_json(calib["chartx"])["step_time_s"]
  torch_step_s = _last_json(calib["torch"])["step_time_s"]
  chartx_steps = max(int(args.budget_s / chartx_step_s), 1)
  torch_steps = max(int(args.budget_s / torch_step_s), 1)

  workdir = os.path.join(run_dir, "chartx")
  logs = {"chartx": os.path.join(run_dir, "chartx_train.log"), "torch": os.path.join(run_dir, "torch_train.log")}
  start = time.time()
  chartx = _run([py, "-m", "chartx.main", *_config_args(overrides), f"--workdir={workdir}",
                 f"--config.train.num_steps={chartx_steps}", "--config.train.eval_every=0",
                 f"--config.train.checkpoint_every={chartx_steps}", "--config.checkpoint.resume=False"],
                0, logs["chartx"])
  torch = _run([py, "-m", "benchmarks.torch_gpt", f"--data={data}", f"--budget_s={args.budget_s}",
                f"--num_steps={torch_steps}", *_torch_dims(overrides), f"--out={os.path.join(run_dir, 'torch.json')}"], 1, logs["torch"])
  while chartx.poll() is None and time.time() < start + args.budget_s:
    time.sleep(1)
  if chartx.poll() is None:
    chartx.send_signal(signal.SIGTERM)  # Finishes the step, saves it, exits 0.
  _wait(chartx, logs["chartx"])
  chartx_done = time.time() - start
  eval_log = os.path.join(run_dir, "chartx_eval.log")
  # Scoring is off the clock; torch_gpt scores its model on its core meanwhile.
  _wait(_run([py, "-m", "chartx.main", *_config_args(overrides), f"--workdir={workdir}", "--mode=eval",
              "--config.eval.max_chars=0"], 0, eval_log), eval_log)
  _wait(torch, logs["torch"])
  with open(os.path.join(workdir, "eval_validation.json"), encoding="utf-8") as f:
    chartx_eval = json.load(f)
  torch_result = _last_json(logs["torch"])
  return {"repeat": index, "budget_s": args.budget_s, "overrides": overrides, "load_avg": os.getloadavg()[0],
          "chartx_calibrated_step_s": chartx_step_s, "torch_calibrated_step_s": torch_step_s,
          "chartx_steps": chartx_eval["step"], "chartx_horizon": chartx_steps, "chartx_train_s": chartx_done,
          "chartx_bpc": chartx_eval["bpc"], "chartx_chars": chartx_eval["num_chars"],
          "torch_steps": torch_result["steps"], "torch_horizon": torch_steps, "torch_train_s": torch_result["train_s"],
          "torch_step_time_s": torch_result["step_time_s"], "torch_bpc": torch_result["validation_bpc"],
          "torch_chars": torch_result["validation_chars"], "torch_params": torch_result["params"]}


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
  parser.add_argument("--out", default="/tmp/time_to_bpc")
  args, overrides = parser.parse_known_args()
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad or args.budget_s <= 0 or args.repeats < 1:
    print(f"error: {'unknown argument ' + bad[0] if bad else '--budget_s and --repeats must be positive'}",
          file=sys.stderr)
    sys.exit(1)
  if len(os.sched_getaffinity(0)) < 2:
    print("error: the side-by-side run needs 2 CPU cores (one each)", file=sys.stderr)
    sys.exit(1)
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for index in range(args.repeats):
    row = one_repeat(args, overrides, args.out, index)
    rows.append(row)
    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
  print(f"\n| repeat | chartx steps | chartx bpc | torch steps | torch bpc |\n|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['repeat']} | {row['chartx_steps']} | {row['chartx_bpc']:.4f} | {row['torch_steps']} | "
          f"{row['torch_bpc']:.4f} |")
  if len(rows) > 1:
    print(f"median: chartx {statistics.median(r['chartx_bpc'] for r in rows):.4f}, "
          f"torch {statistics.median(r['torch_bpc'] for r in rows):.4f}")


if __name__ == "__main__":
  main()
