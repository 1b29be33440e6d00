"""Where the train step's time goes: chartx's (jax.profiler) beside the PyTorch reference's.

    taskset -c 0 python -m benchmarks.profile_step [--config=configs/bench_cpu.py] [--steps=3]

Pinned to one core, every op runs on the one thread the profile records (with several threads,
XLA's matmul workers are not in the trace). chartx's ops are grouped by the model code that made
them (the op_name metadata XLA keeps on each fused op: the Flax module path and the jnp call);
PyTorch's by aten op. Prints milliseconds per step and shares for both, and one JSON line.
"""

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# Each chartx op goes to the first group whose pattern its op_name contains: the named scopes of
# chartx.families and chartx.losses, in the forward and the backward pass alike.
_GROUPS = (("heads and losses", "heads"), ("attention", "attention"), ("feed-forward", "feed_forward"),
           ("attention projections", "projections"), ("layer norms", "layer_norm"))


def _group(op_name: str) -> str:
  for group, scope in _GROUPS:
    if re.search(rf"[/(]{scope}[/)]", op_name):  # ".../feed_forward/..." or "jvp(heads)/..."
      return group
  return "other (optimizer, embeddings, residual adds, copies)"


def chartx_profile(config, steps: int) -> dict[str, float]:
  """Milliseconds per step of each group, from a jax.profiler trace of `steps` train steps."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from chartx import sharding, train  # pylint: disable=import-outside-toplevel
  from chartx.tools import bench  # pylint: disable=import-outside-toplevel
  task = train.make_task(config, 256)
  mesh, rules = sharding.check_config(config)
  abstract, shardings, create = sharding.sharded_init(
      functools.partial(train.init_state, task, seq_len=config.data.seq_len), mesh, rules)
  step_fn = train.jit_train_step(task, mesh, shardings, rules)
  windows_BxS = bench.synthetic_windows(config, mesh, 256, task.model_cfg.num_targets)
  rng = jax.random.key(1)
  # No stream starts over (the step's reset_B; only a family with a memory reads it).
  resets_B = jax.device_put(np.zeros(config.train.batch_size, bool), sharding.batch_sharding(mesh))
  compiled = step_fn.lower(abstract, windows_BxS, rng, resets_B).compile()
  op_names = dict(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"',
                             compiled.as_text(), re.M))
  state = create(jax.random.key(0))
  for _ in range(2):
    state, _ = compiled(state, windows_BxS, rng, resets_B)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(steps):
      state, _ = compiled(state, windows_BxS, rng, resets_B)
      jax.block_until_ready(state)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(path))["traceEvents"]
  ms = collections.Counter()
  for event in events:
    name = event.get("name", "")
    # Leaf ops only: control flow (while, conditional) encloses ops that are counted themselves.
    if event.get("ph") == "X" and name in op_names and not name.startswith(("while", "conditional", "call")):
      ms[_group(op_names[name])] += event["dur"] / 1e3 / steps
  ms["step (wall clock)"] = 1e3 * wall / steps
  return dict(ms)


def torch_profile(config, steps: int) -> dict[str, float]:
  """Milliseconds per step of each aten op group of the PyTorch reference's step."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from chartx import train  # pylint: disable=import-outside-toplevel
  from chartx.tools import bench, torch_reference  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  task = train.make_task(config, 256)
  step = torch_reference.make_torch_step(**bench.torch_step_kwargs(config, task.model_cfg, task.loss_cfg))
  windows_BxS = np.random.default_rng(0).integers(
      0, 256, (config.train.batch_size, config.data.seq_len + task.model_cfg.num_targets), dtype=np.int32)
  for _ in range(2):
    step(windows_BxS)
  groups = {"aten::mm": "matmuls (aten::mm)", "aten::bmm": "heads (aten::bmm)",
            "flash_attention": "attention (flash kernel)"}
  ms = collections.Counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      step(windows_BxS)
    wall = time.perf_counter() - start
  for event in prof.key_averages():
    group = next((g for k, g in groups.items() if k in event.key), "other (elementwise, norms, softmax, optimizer)")
    ms[group] += event.self_cpu_time_total / 1e3 / steps
  ms["step (wall clock)"] = 1e3 * wall / steps
  return dict(ms)


def _print(title: str, ms: dict[str, float]) -> None:
  total = sum(v for k, v in ms.items() if k != "step (wall clock)")
  print(f"{title}: {ms['step (wall clock)']:.0f} ms a step (ops {total:.0f} ms)")
  for group, value in sorted(((k, v) for k, v in ms.items() if k != "step (wall clock)"), key=lambda x: -x[1]):
    print(f"  {value:8.1f} ms  {100 * value / total:5.1f}%  {group}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/bench_cpu.py")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  from chartx import malloc  # pylint: disable=import-outside-toplevel
  malloc.keep_freed_memory()  # As chartx.main and chartx.bench do.
  sys.path.insert(0, os.getcwd())
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("profiled_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  result = {"config": args.config, "cpus": len(os.sched_getaffinity(0)), "chartx": chartx_profile(config, args.steps)}
  _print("chartx", result["chartx"])
  if not args.no_torch:
    result["torch"] = torch_profile(config, args.steps)
    _print("PyTorch reference", result["torch"])
  print(json.dumps(result))


if __name__ == "__main__":
  main()
