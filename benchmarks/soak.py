"""Soak: a run killed again and again (kill -9 or SIGTERM, at random points, during saves too) and
resumed each time ends bitwise where an uninterrupted run ends.

    python -m benchmarks.soak --cycles=10 --families=fixed,xl --seed=0 --out=/tmp/chartx_soak

For each family, configs/tiny.py (on a fixed generated text, a checkpoint every 2 steps) runs once
uninterrupted, and once as a victim: started with the same command, then stopped --cycles times,
each time at a random point from --seed: after a random number of further steps, or as soon as a
save is being written (an Orbax *.orbax-checkpoint-tmp directory exists), by SIGKILL or SIGTERM
(which must end the run with status 0 after saving its step), and started again. The last start
runs to the end. The victim's final train state (parameters, optimizer state, XL's memory) must
equal the uninterrupted run's byte for byte. Prints one JSON line per family; exit 1 on a mismatch.
tests/test_soak.py runs 2 cycles of 30 steps.
"""

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"fixed": [], "xl": ["--config.model.family=xl", "--config.model.mem_len=16"]}
_WORDS = ("the of and to in is was for that on with as by at from his an are which character "
          "model layer attention window context predict checkpoint resume signal").split()


def _command(workdir: str, text: str, family: str, num_steps: int) -> list[str]:
  return [sys.executable, "-m", "chartx.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.path={text}", f"--config.train.num_steps={num_steps}",
          "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2",
          "--config.train.log_every=1", "--config.train.eval_every=0", *FAMILIES[family]]


def _start(cmd: list[str], workdir: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  with open(f"{workdir}.log", "a", encoding="utf-8") as log:  # A file: a full pipe would stall it.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _logged_step(workdir: str) -> int:
  """The newest training step in metrics.jsonl (0 if none)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = [line for line in f.read().splitlines() if line.endswith("}")]
  except FileNotFoundError:
    return 0
  steps = [r["step"] for r in map(json.loads, lines) if "loss" in r]
  return max(steps, default=0)


def _saving(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def _final_state(workdir: str, step: int) -> dict[str, np.ndarray]:
  """Every array of checkpoint `step`, by path, restored onto one device as saved."""
  import jax  # pylint: disable=import-outside-toplevel  (slow; not for --help)
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                  item_handlers=ocp.PyTreeCheckpointHandler())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step).tree)
    tree = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  finally:
    manager.close()
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(tree, sep="/").items()}


def soak(out: str, family: str, cycles: int, seed: int, num_steps: int = 60) -> dict:
  """Runs the soak of one family in OUT/<family>; returns its record (see the module docstring)."""
  rng = random.Random(f"{seed}/{family}")
  root = os.path.join(out, family)
  os.makedirs(root, exist_ok=True)
  text = os.path.join(root, "text.txt")
  with open(text, "w", encoding="utf-8") as f:
    f.write(" ".join(np.random.default_rng(0).choice(_WORDS, size=8000)) + "\n")
  reference_dir, victim_dir = os.path.join(root, "reference"), os.path.join(root, "victim")
  start = time.perf_counter()
  reference = _start(_command(reference_dir, text, family, num_steps), reference_dir)
  stops = []
  for _ in range(cycles):
    proc = _start(_command(victim_dir, text, family, num_steps), victim_dir)
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    during_save = rng.random() < 0.5
    target = _logged_step(victim_dir) + rng.randint(1, 4)
    while proc.poll() is None:
      logged = _logged_step(victim_dir)
      # During a save if one is seen in time (they take milliseconds at this size), else later.
      if logged >= target + (6 if during_save else 0) or (during_save and logged >= target - 1
                                                          and _saving(victim_dir)):
        break
      time.sleep(0.002)
    if proc.poll() is not None:
      raise RuntimeError(f"the run ended before it was stopped (status {proc.returncode}); "
                         f"raise num_steps: see {victim_dir}.log")
    proc.send_signal(sig)
    status = proc.wait(timeout=300)
    expected = 0 if sig == signal.SIGTERM else -signal.SIGKILL
    if status != expected:
      raise RuntimeError(f"{signal.Signals(sig).name} at step {_logged_step(victim_dir)} ended "
                         f"the run with status {status}, not {expected}: see {victim_dir}.log")
    stops.append({"signal": signal.Signals(sig).name, "during_save": during_save,
                  "logged_step": _logged_step(victim_dir)})
  last = _start(_command(victim_dir, text, family, num_steps), victim_dir)
  if last.wait(timeout=600) != 0 or reference.wait(timeout=600) != 0:
    raise RuntimeError(f"a run failed: see {victim_dir}.log and {reference_dir}.log")
  victim_state, reference_state = (_final_state(victim_dir, num_steps),
                                   _final_state(reference_dir, num_steps))
  equal = (victim_state.keys() == reference_state.keys() and all(
      victim_state[k].dtype == reference_state[k].dtype
      and victim_state[k].tobytes() == reference_state[k].tobytes() for k in victim_state))
  return {"family": family, "cycles": cycles, "seed": seed, "num_steps": num_steps,
          "bitwise_equal": bool(equal), "arrays": len(victim_state), "stops": stops,
          "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
  parser.add_argument("--cycles", type=int, default=10, help="stops of each victim run")
  parser.add_argument("--families", default="fixed,xl", help="comma-separated: fixed, xl")
  parser.add_argument("--seed", type=int, default=0, help="seed of the stop points and signals")
  parser.add_argument("--num_steps", type=int, default=60, help="steps of each run")
  parser.add_argument("--out", default="/tmp/chartx_soak", help="directory of the runs")
  args = parser.parse_args(argv)
  ok = True
  for family in args.families.split(","):
    record = soak(args.out, family, args.cycles, args.seed, args.num_steps)
    print(json.dumps(record), flush=True)
    ok = ok and record["bitwise_equal"]
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
