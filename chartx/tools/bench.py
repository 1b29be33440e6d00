"""Benchmark of the train step: compile time, step time, chars/s, MFU and peak memory.

    python -m chartx.bench --config=configs/bench_cpu.py --torch --out=/tmp/bench.jsonl
    python -m chartx.bench --config=configs/enwik8_64l.py --compile_only
    python -m chartx.bench --config=configs/bench_cpu.py --profile=/tmp/bench_profile
    python -m chartx.bench --config=configs/enwik8_12l.py --config.model.dtype=bfloat16 \
        --config.model.attention=cudnn --config.model.dropout=0

The step is chartx.train's own jitted train step (all auxiliary losses as configured), fed
synthetic random windows, so no dataset is needed. Compile time is the lowering (tracing to
StableHLO) plus XLA's compilation, against abstract arguments. Step time is the median of
--steps timed steps after --warmup untimed ones; each step is timed from dispatch to
jax.block_until_ready of its new state. With --torch, the PyTorch reference
(chartx.tools.torch_reference, CPU) trains the same model on the same windows in the same process,
one step of each in turn, so that both see the same machine load; chartx_over_torch is the
ratio of throughputs (torch's step time over chartx's). On a GPU the per-step block adds a host
round trip to each step (microseconds, against steps of tens of milliseconds).

Each run prints one JSON object on one line and appends it to --out when given. Its keys:
  what ran     config, overrides, time, host, backend, device_kind, num_devices, jax_version,
               xla_flags, glibc_tunables, malloc_tuned (chartx.malloc's settings applied), cpu_count,
               the model and loss settings (num_layers ... multiple_positions), params
  machine load load_avg_before, load_avg_after: the 1-minute load average (os.getloadavg) as the
               run starts and after its timed steps; above cpu_count, other processes competed
  compile      lower_s, compile_s, compile_total_s (seconds)
  steps        steps, warmup, loss (of the last timed step), step_times_s (each timed step),
               step_time_s (their median), step_time_mean_s, step_time_min_s, step_cpu_time_s
               (median CPU seconds of this process per step, all threads), chars_per_sec
               (batch_size x seq_len / step_time_s)
  FLOPs        flops_per_char (chartx.families.base.Family.flops_per_char: MaxText's causal count),
               flops_per_sec (achieved), peak_flops_per_sec and peak_flops_source (which peak and
               where it came from; null off the known accelerators), mfu (null without a peak)
  memory       peak_memory_bytes, peak_memory_source: the devices' peak_bytes_in_use where JAX
               reports it (GPU, TPU), else the process's max RSS, read before PyTorch is loaded
  --torch      torch_version, torch_threads, torch_params, torch_peak_memory_bytes (the max RSS
               of a separate process running the reference's step, with chartx.malloc's
               settings), torch_loss, torch_step_times_s, torch_step_time_s (median), torch_step_time_mean_s, torch_step_time_min_s,
               torch_step_cpu_time_s, torch_chars_per_sec, chartx_over_torch (the ratio of the
               medians), chartx_over_torch_paired (the median of the ratios of each chartx step
               and the torch step right after it, which saw about the same machine load),
               chartx_over_torch_min (the ratio of the fastest steps: on a shared machine, the
               estimate least affected by other processes; all three agree on a quiet one)
With --compile_only the step, FLOPs and memory keys are absent.
"""

import datetime
import functools
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from chartx import cpu_devices, errors, flops, losses, malloc, profiling, sharding, train
from chartx.families import layers
from chartx import data
from chartx.errors import UserError

def vocab_size_of(config: ml_collections.ConfigDict, override: int = 0) -> int:
  if override < 0:
    raise UserError(f"--vocab_size must be >= 0 (0: from the config), got {override}")
  if override:
    return override
  return data.vocab_for(config.data).size


def synthetic_windows(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, vocab_size: int,
                      num_targets: int) -> jax.Array:
  """A global batch of random windows, seq_len + num_targets long, sharded like real batches."""
  # Processes that hold replicas of a slice must feed the same rows (sharding.process_slice).
  index, count = sharding.process_slice(mesh, config.train.batch_size)
  rows = config.train.batch_size // count
  rng = np.random.default_rng([config.seed, index])
  local_BxS = rng.integers(0, vocab_size, (rows, config.data.seq_len + num_targets), dtype=np.int32)
  return sharding.global_batch(local_BxS, mesh)


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the devices' peak allocation where JAX reports it, else the process's max RSS."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return max(s["peak_bytes_in_use"] for s in stats), "max over local devices of memory_stats()['peak_bytes_in_use']"
  return (malloc.peak_rss_bytes(),
          "process max RSS (VmHWM, malloc.peak_rss_bytes): the most this process has held at once, "
          "Python, JAX and XLA's compilation included")


def _time_steps(step: Callable[[], Any], count: int) -> tuple[list[float], list[float], Any]:
  """(wall seconds, process CPU seconds, last result) of `count` calls of a blocking step.

  CPU time counts every thread of this process; on a shared machine it is inflated less than
  wall time by other processes' load.
  """
  wall, cpu, result = [], [], None
  for _ in range(count):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = step()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return wall, cpu, result


def benchmark(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
              compile_only: bool = False, with_torch: bool = False, vocab_size: int = 0,
              profile_dir: str = "") -> dict[str, Any]:
  """Runs the benchmark for one config and returns its JSON record. profile_dir: trace the timed
  chartx steps with the JAX profiler into PROFILE_DIR/plugins/profile (as train.profile_steps)."""
  if steps < 1:
    raise UserError(f"--steps must be >= 1, got {steps}")
  if warmup < 0:
    raise UserError(f"--warmup must be >= 0, got {warmup}")
  vocab_size = vocab_size_of(config, vocab_size)
  task = train.make_task(config, vocab_size)
  cfg = task.model_cfg
  if with_torch and not compile_only:
    _check_torch_comparable(config, cfg)
  mesh, rules = sharding.check_config(config)
  seq_len, batch_size = config.data.seq_len, config.train.batch_size
  devices = jax.devices()
  record: dict[str, Any] = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": platform.node(), "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
      "num_devices": len(devices), "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg()[0],
      "num_layers": cfg.num_layers, "d_model": cfg.d_model, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff,
      "seq_len": seq_len, "batch_size": batch_size, "vocab_size": vocab_size, "dtype": cfg.dtype,
      "attention": cfg.attention, "remat": cfg.remat, "scan_layers": cfg.scan_layers,
      "dropout": cfg.dropout, "num_targets": cfg.num_targets,
      "intermediate_layers": task.loss_cfg.intermediate_layers,
      "multiple_positions": task.loss_cfg.multiple_positions,
  }

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  dropout_rng = jax.device_put(dropout_rng, sharding.replicated(mesh))
  # Compiled against shapes alone, so the compile time does not wait for initialization.
  abstract_state, shardings, create_state = sharding.sharded_init(
      functools.partial(train.init_state, task, seq_len=seq_len), mesh, rules)
  record["params"] = layers.count_params(abstract_state.params)
  windows_BxS = synthetic_windows(config, mesh, vocab_size, cfg.num_targets)
  # The step also takes the rows whose stream starts over (a family with a memory): none, every step.
  no_resets_B = np.zeros(config.train.batch_size, bool)
  resets_B = jax.make_array_from_callback(no_resets_B.shape, sharding.batch_sharding(mesh),
                                          lambda index: no_resets_B[index])
  step_fn = train.jit_train_step(task, mesh, shardings, rules)
  start = time.perf_counter()
  lowered = step_fn.lower(abstract_state, windows_BxS, dropout_rng, resets_B)
  record["lower_s"] = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  record["compile_s"] = time.perf_counter() - start
  record["compile_total_s"] = record["lower_s"] + record["compile_s"]
  if compile_only:
    return record

  current = [create_state(init_rng)]
  # The timed steps follow the warmup; a profiled run's step times include the profiler's cost.
  profiler = profiling.StepProfiler(f"{warmup},{warmup + steps}" if profile_dir else "",
                                    profile_dir, label="bench")
  calls = itertools.count()

  def chartx_step() -> jax.Array:
    step = next(calls)
    with profiler.step(step):
      current[0], out = compiled(current[0], windows_BxS, dropout_rng, resets_B)
    jax.block_until_ready(current[0])
    profiler.done(step, current[0])
    return out["loss"]

  _time_steps(chartx_step, warmup)
  # Before PyTorch is loaded, so that a CPU RSS high-water mark is chartx's alone.
  record["peak_memory_bytes"], record["peak_memory_source"] = peak_memory()
  wall, cpu = [], []
  if with_torch:
    torch_step, torch_info = _torch_step(config, cfg, task.loss_cfg, np.asarray(windows_BxS))
    record.update(torch_info)
    _time_steps(torch_step, warmup)
    torch_wall, torch_cpu = [], []
    for _ in range(steps):  # Interleaved, so that a burst of load on the machine hits both alike.
      w, c, loss = _time_steps(chartx_step, 1)
      wall, cpu = wall + w, cpu + c
      w, c, torch_loss = _time_steps(torch_step, 1)
      torch_wall, torch_cpu = torch_wall + w, torch_cpu + c
  else:
    wall, cpu, loss = _time_steps(chartx_step, steps)

  step_s = statistics.median(wall)
  record.update(steps=steps, warmup=warmup, loss=float(loss), step_times_s=wall, step_time_s=step_s,
                step_time_mean_s=statistics.fmean(wall), step_time_min_s=min(wall),
                step_cpu_time_s=statistics.median(cpu), chars_per_sec=batch_size * seq_len / step_s)
  record.update(_flops(cfg, task, seq_len, record["chars_per_sec"], devices))
  record["load_avg_after"] = os.getloadavg()[0]
  if with_torch:
    torch_s = statistics.median(torch_wall)
    # Each chartx step's time over the torch step right after it: the two saw about the same load.
    paired = statistics.median(t / c for t, c in zip(torch_wall, wall))
    record.update(torch_loss=torch_loss, torch_step_times_s=torch_wall, torch_step_time_s=torch_s,
                  torch_step_time_mean_s=statistics.fmean(torch_wall), torch_step_time_min_s=min(torch_wall),
                  torch_step_cpu_time_s=statistics.median(torch_cpu),
                  torch_chars_per_sec=batch_size * seq_len / torch_s, chartx_over_torch=torch_s / step_s,
                  chartx_over_torch_paired=paired,
                  chartx_over_torch_min=min(torch_wall) / min(wall))
  return record


def _flops(cfg: layers.ModelConfig, task: train.Task, seq_len: int, chars_per_sec: float,
           devices: list[Any]) -> dict[str, Any]:
  """FLOPs per character (MaxText's causal count), achieved FLOP/s and MFU against the bf16 peak."""
  per_char = task.family.flops_per_char(cfg, seq_len, task.loss_cfg.intermediate_layers,
                                        batch_size=task.batch_size)
  achieved = per_char * chars_per_sec
  peak = flops.peak_flops(devices[0])
  if peak is None:
    source = f"none: no peak known for device_kind {devices[0].device_kind!r}, so no MFU"
  else:
    source = (f"dense bf16 peak of a {devices[0].device_kind!r} from its datasheet "
              f"(chartx.flops.peak_flops) x {len(devices)} devices")
  return {"flops_per_char": per_char, "flops_per_sec": achieved,
          "peak_flops_per_sec": peak * len(devices) if peak else None,
          "peak_flops_source": source, "mfu": flops.mfu(achieved, devices)}


def _check_torch_comparable(config: ml_collections.ConfigDict, cfg: layers.ModelConfig) -> None:
  """The reference implements the paper's step only: float32, ReLU, SGD with momentum, no clipping."""
  opt = config.optimizer
  for key, value, wanted in (("model.dtype", cfg.dtype, "float32"),
                             ("model.activation", cfg.activation, "relu"),
                             ("optimizer.name", opt.name, "momentum"),
                             ("optimizer.nesterov", opt.nesterov, False),
                             ("optimizer.grad_clip", opt.grad_clip, 0.0),
                             ("loss.layer_reduction", config.loss.layer_reduction, "sum")):
    if value != wanted:
      raise UserError(f"--torch runs the PyTorch reference, which needs config.{key}={wanted!r}; "
                      f"got {value!r}")
  if cfg.positions not in ("per_layer", "input"):
    raise UserError("--torch runs the PyTorch reference, which has learned positions only: "
                    f"config.model.positions must be per_layer or input; got {cfg.positions!r}")
  if importlib.util.find_spec("torch") is None:  # Found, not imported: see peak_memory_bytes.
    raise UserError("--torch needs PyTorch: pip install 'chartx[bench]'")


def torch_step_kwargs(config: ml_collections.ConfigDict, cfg: layers.ModelConfig,
                      loss_cfg: losses.LossConfig) -> dict[str, Any]:
  """chartx.tools.torch_reference.make_torch_step's arguments for the model and losses of a run."""
  opt = config.optimizer
  return dict(
      vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, d_model=cfg.d_model,
      num_heads=cfg.num_heads, d_ff=cfg.d_ff, max_len=cfg.max_len, dropout=cfg.dropout,
      num_targets=cfg.num_targets, per_layer_positions=cfg.positions == "per_layer",
      tie_embeddings=cfg.tie_embeddings, multiple_positions=loss_cfg.multiple_positions,
      intermediate_layers=loss_cfg.intermediate_layers, aux_target_weight=loss_cfg.aux_target_weight,
      num_steps=loss_cfg.num_steps, learning_rate=opt.learning_rate, momentum=opt.momentum,
      seed=config.seed)


def _torch_step(config: ml_collections.ConfigDict, cfg: layers.ModelConfig,
                loss_cfg: losses.LossConfig, windows_BxS: np.ndarray) -> tuple[Callable[[], None], dict]:
  """The PyTorch reference's train step on the same dims, losses and windows; and what it ran."""
  import torch  # pylint: disable=import-outside-toplevel
  from chartx.tools import torch_reference  # pylint: disable=import-outside-toplevel
  kwargs = torch_step_kwargs(config, cfg, loss_cfg)
  step = torch_reference.make_torch_step(**kwargs)
  info = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
          "torch_params": torch_reference.count_params(step.model),
          "torch_peak_memory_bytes": _torch_peak_memory(kwargs, windows_BxS)}
  # step() returns the loss as a Python float, so it has finished when it returns.
  return lambda: step(windows_BxS), info


def _torch_peak_memory(kwargs: dict[str, Any], windows_BxS: np.ndarray) -> int:
  """The max RSS of a fresh process that runs the PyTorch reference's step 3 times: its peak_memory_bytes,
  measured apart, since this process's high-water mark is chartx's too (and the same malloc settings)."""
  code = ("import json, sys, numpy as np; from chartx import malloc; malloc.keep_freed_memory(); "
          "from chartx.tools import torch_reference; args = json.loads(sys.argv[1]); "
          "windows = np.asarray(args.pop('windows'), np.int32); step = torch_reference.make_torch_step(**args); "
          "[step(windows) for _ in range(3)]; print(malloc.peak_rss_bytes())")
  arg = json.dumps({**kwargs, "windows": windows_BxS.tolist()})
  result = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True)
  return int(result.stdout.split()[-1])


def _jsonable(value: Any) -> Any:
  return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, so that importing chartx.bench
  beside chartx.main (which has its own --config) does not define a flag twice."""
  holders = {
      "config": config_flags.DEFINE_config_file("config", None, "Config file with a get_config().",
                                                lock_config=True),
      "steps": flags.DEFINE_integer("steps", 10, "Timed train steps (the step time is their median)."),
      "warmup": flags.DEFINE_integer("warmup", 2, "Untimed steps run after compilation, before timing."),
      "torch": flags.DEFINE_bool("torch", False, "Also time the PyTorch reference on the same dims "
                                 "(needs the bench extra: pip install 'chartx[bench]')."),
      "out": flags.DEFINE_string("out", None, "Append the JSON line to this file as well."),
      "profile": flags.DEFINE_string("profile", "", "Trace the timed steps with the JAX profiler into "
                                     "DIR/plugins/profile (tensorboard --logdir DIR, PROFILE tab)."),
      "compile_only": flags.DEFINE_bool("compile_only", False, "Only lower and compile the train step."),
      "vocab_size": flags.DEFINE_integer("vocab_size", 0, "Vocabulary size; 0: from config.data.name "
                                         "(27 for text8, 256 bytes otherwise)."),
  }
  flags.mark_flags_as_required(["config"])
  return holders


def main(argv: list[str], holders: dict[str, flags.FlagHolder]) -> None:
  logging.set_verbosity(logging.WARNING)
  malloc_tuned = malloc.keep_freed_memory()  # As python -m chartx.main does, before JAX allocates.
  with errors.one_line_errors():
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    cpu_devices.split_cores(holders["config"].value, "train")  # As python -m chartx.main does.
    record = benchmark(holders["config"].value, steps=holders["steps"].value,
                       warmup=holders["warmup"].value, compile_only=holders["compile_only"].value,
                       with_torch=holders["torch"].value, vocab_size=holders["vocab_size"].value,
                       profile_dir=holders["profile"].value)
    record["malloc_tuned"] = malloc_tuned
    record["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
    record["overrides"] = {k: _jsonable(v) for k, v in
                           config_flags.get_override_values(flags.FLAGS["config"]).items()}
  line = json.dumps(record)
  print(line, flush=True)
  if holders["out"].value:
    with open(holders["out"].value, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def cli() -> None:
  """The `chartx-bench` console command (pyproject.toml), the same as python -m chartx.bench."""
  holders = _define_flags()
  errors.adopt_main_module(__name__, __doc__)
  app.run(functools.partial(main, holders=holders),
          flags_parser=functools.partial(errors.parse_flags, config=holders["config"]))


if __name__ == "__main__":
  cli()
