"""--mode=compile: a run's train step and eval step compiled ahead of time for a TPU slice that is
not here, with the real shardings, on any machine where libtpu is installed (pip install
'chartx[tpu]'): whether a config compiles for a TPU, fits its memory and uses its kernels, known
before a TPU is rented. docs/tpu.md has the paper configs' table.

    python -m chartx.main --config=configs/enwik8_64l.py --workdir=DIR --mode=compile \
        --config.compile.topology=v4:2x2x1

JAX describes the slice (jax.experimental.topologies: compile-only devices, one per chip, or per
TensorCore on v2 and v3); the run's mesh is laid over them, the "auto" keys (model.dtype,
model.attention) resolve for a TPU, not for this host, and the TPU compiler (Mosaic for the
Pallas splash kernel included) compiles both steps. Written to WORKDIR/compile_<topology>.json
and printed: compile time, per-device argument / temporary / output memory against the chip's HBM,
the step's FLOPs (chartx's own count, the family's flops_per_char: XLA's cost analysis counts a
scanned loop's body once) and a roofline: the step takes at least the longer of its FLOPs at the
chips' peak and its unavoidable HBM traffic at their bandwidth (the state read and written, the
temporaries written and read once), so its step time is a lower bound and its MFU an upper one.
With compile.max_batch, the largest global batch whose train step fits, found by compiling.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from chartx import data, files, flops, inference, sharding, train
from chartx.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: float  # HBM of one JAX device (v2, v3: half a chip, one per TensorCore).
  hbm_bytes_per_sec: float  # HBM bandwidth of one JAX device.


_GIB = 2**30
# Matched in order against device_kind (lower case), as flops.peak_flops matches its peaks.
# Per chip (cloud.google.com/tpu/docs/v2 ... /v6e, "system architecture"): v2 16 GiB, 700 GB/s;
# v3 32 GiB, 900 GB/s; v4 32 GiB, 1,200 GB/s; v5e 16 GiB, 819 GB/s; v5p 95 GiB, 2,765 GB/s;
# v6e 32 GiB, 1,640 GB/s. NVIDIA's datasheets: H100 SXM 80 GB, 3.35 TB/s; H200 SXM 141 GB, 4.8 TB/s.
CHIPS = (
    ("tpu v2", Chip("v2", 8 * _GIB, 350e9)),
    ("tpu v3", Chip("v3", 16 * _GIB, 450e9)),
    ("tpu v4", Chip("v4", 32 * _GIB, 1200e9)),
    ("tpu v5 lite", Chip("v5e", 16 * _GIB, 819e9)),
    ("tpu v5e", Chip("v5e", 16 * _GIB, 819e9)),
    ("tpu v5", Chip("v5p", 95 * _GIB, 2765e9)),
    ("tpu v6 lite", Chip("v6e", 32 * _GIB, 1640e9)),
    ("tpu v6e", Chip("v6e", 32 * _GIB, 1640e9)),
    ("h100", Chip("H100", 80e9, 3.35e12)),
    ("h200", Chip("H200", 141e9, 4.8e12)),
)
# {name: (jitted step, the abstract arguments it is lowered with)}.
Programs = dict[str, tuple[sharding.MeshJit, tuple[Any, ...]]]
# VERSION:AxBxC, as jax.experimental.topologies takes it (v4:2x2x1 is a v4-8; docs/tpu.md).
_TOPOLOGY = re.compile(r"^v\d+[a-z]*:\d+(x\d+){1,2}$")
# v4 runs as JAX runs it on a v4 TPU VM: one device per chip (its two TensorCores as one).
_CHIP_CONFIG = {"v4": "megacore"}


def check_config(config: ml_collections.ConfigDict) -> None:
  """The compile section's owner: its keys' forms (the topology itself: target_devices). A config
  saved by a run from before the section existed has none to check."""
  c = config.get("compile")
  if c is None:
    return
  if c.topology and not _TOPOLOGY.match(c.topology):
    raise UserError(f"config.compile.topology={c.topology!r} is not a TPU topology such as "
                    "v4:2x2x1, v5e:2x4 or v5p:4x4x4 (docs/tpu.md)")
  if c.num_slices < 1:
    raise UserError(f"config.compile.num_slices must be >= 1, got {c.num_slices}")


def chip(device: Any) -> Chip | None:
  """The CHIPS entry of a JAX device, or None (CPUs, unknown accelerators)."""
  kind = str(getattr(device, "device_kind", "")).lower()
  return next((c for name, c in CHIPS if name in kind), None)


def target_devices(config: ml_collections.ConfigDict) -> list[Any]:
  """The compile-only devices of config.compile.topology (x compile.num_slices slices)."""
  check_config(config)
  name = config.compile.topology
  if not name:
    raise UserError("--mode=compile needs config.compile.topology, e.g. "
                    "--config.compile.topology=v4:2x2x1 (docs/tpu.md)")
  if importlib.util.find_spec("libtpu") is None:
    raise UserError("--mode=compile needs libtpu, the TPU compiler: pip install 'chartx[tpu]'")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from chartx import malloc  # pylint: disable=import-outside-toplevel
  if not malloc.tpu_chips():
    # No TPU here: libtpu, started for the topology, would look for this host's TPU slice (cloud
    # metadata) and log errors that it found none; these say there is none to look for. Nor is
    # there a chip to guard with libtpu's one-process lock (/tmp/libtpu_lockfile), which would
    # refuse a second compiling process (tests, a sweep of configs) while one runs.
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", "v4-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
      os.environ.setdefault(key, value)
  kwargs = {}
  if name.split(":")[0] in _CHIP_CONFIG:
    kwargs["chip_config_name"] = _CHIP_CONFIG[name.split(":")[0]]
  if config.compile.num_slices > 1:
    kwargs["num_slices"] = config.compile.num_slices
  try:
    return list(topologies.get_topology_desc(name, platform="tpu", **kwargs).devices)
  except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError.
    raise UserError(f"config.compile.topology={name!r}: {str(e).splitlines()[0]}") from e


def _abstract(shape: tuple[int, ...], dtype: Any, spec: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)


def family_programs(config: ml_collections.ConfigDict, task: train.Task, mesh: jax.sharding.Mesh,
                    rules: sharding.Rules, state: train.TrainState,
                    state_shardings: Any) -> Programs:
  """{"train_step": (jitted, args), "eval_step": (jitted, args)}: the two steps a run of the
  family compiles, each with the abstract arguments (shapes, dtypes, shardings) it is lowered
  with. The train step has one signature for every family (a family's memory rides in the
  state); the eval step is the family's protocol's (Protocol.step_program)."""
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  rows, seq_len = config.train.batch_size, config.data.seq_len
  rng = jax.eval_shape(jax.random.key, 0)
  train_args = (state, _abstract((rows, seq_len + task.model_cfg.num_targets), jnp.int32, batch),
                _abstract(rng.shape, rng.dtype, replicated), _abstract((rows,), jnp.bool_, batch))
  programs = {"train_step": (train.jit_train_step(task, mesh, state_shardings, rules), train_args)}
  proto = task.family.protocol(config)
  model = inference.inference_model(task.model, proto)
  programs["eval_step"] = proto.step_program(task.family, model, mesh, rules,
                                             config.eval.batch_size, state.params)
  return programs


def build_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                   platform: str) -> tuple[train.Task, Any, Programs]:
  """(task, abstract state, family_programs) of config on mesh, resolved for platform."""
  task = train.make_task(config, data.check_config(config).size, platform)
  state, shardings, _ = sharding.sharded_init(
      lambda rng: train.init_state(task, rng, seq_len=config.data.seq_len), mesh, rules)
  return task, state, family_programs(config, task, mesh, rules, state, shardings)


def compile_program(jitted: sharding.MeshJit, args: tuple[Any, ...],
                    chip_info: Chip | None) -> dict[str, Any]:
  """Compiles jitted for args; its per-device memory (bytes) and whether it fits chip_info's HBM.
  A program the compiler finds too large for the chip is reported, not raised: fits False."""
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"compile_seconds": round(time.perf_counter() - start, 2), "fits": False,
            "error": str(e).splitlines()[0]}
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  memory = {"argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
            "alias_bytes": stats.alias_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
            "code_bytes": stats.generated_code_size_in_bytes}
  # Donated (aliased) outputs reuse their arguments' buffers.
  peak = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
          + memory["temp_bytes"] + memory["code_bytes"])
  return {"compile_seconds": round(seconds, 2), **memory, "peak_bytes": peak,
          "fits": None if chip_info is None else peak <= chip_info.hbm_bytes}


def roofline(flops_per_step: float, train_memory: dict[str, Any], devices: list[Any],
             num_steps: int) -> dict[str, Any] | None:
  """The train step's roofline on `devices` (None without a known peak or chip): at least its
  FLOPs at their peak, and at least its unavoidable HBM traffic per device (the arguments read,
  the outputs written, the temporaries written and read once) at their bandwidth."""
  peak, chip_info = flops.peak_flops(devices[0]), chip(devices[0])
  if peak is None or chip_info is None or "temp_bytes" not in train_memory:
    return None
  compute_s = flops_per_step / (peak * len(devices))
  traffic = (train_memory["argument_bytes"] + train_memory["output_bytes"]
             + 2 * train_memory["temp_bytes"])
  memory_s = traffic / chip_info.hbm_bytes_per_sec
  step_s = max(compute_s, memory_s)
  return {"peak_flops_per_device": peak, "compute_seconds": compute_s, "hbm_seconds": memory_s,
          "step_seconds": step_s, "mfu": compute_s / step_s, "num_steps": num_steps,
          "seconds_to_num_steps": step_s * num_steps}


def largest_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                  platform: str, chip_info: Chip | None, limit: int = 1 << 16) -> int:
  """The largest global train.batch_size (a multiple of the data-parallel devices and of
  train.grad_accum_steps, at most `limit`) whose train step fits the chip: doubling, then bisection.
  0 when not even the smallest fits."""
  dp = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  unit = math.lcm(dp, config.train.grad_accum_steps)

  def fits(multiple: int) -> bool:
    trial = config.copy_and_resolve_references()
    trial.train.batch_size = multiple * unit
    jitted, args = build_programs(trial, mesh, rules, platform)[2]["train_step"]
    result = compile_program(jitted, args, chip_info)
    print(f"compile: batch {multiple * unit}: peak {_gb(result.get('peak_bytes'))} per device, "
          f"{'fits' if result['fits'] else 'does not fit'}", flush=True)
    return bool(result["fits"])

  low, high = 0, 1  # fits(low * unit) (0: vacuously), not yet known for high.
  while high * unit <= limit and fits(high):
    low, high = high, high * 2
  high = min(high, limit // unit + 1)  # The first multiple known (or taken) not to fit.
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low * unit


def _gb(num_bytes: float | None) -> str:
  if num_bytes is None:
    return "?"
  return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.2f} MB"


def _duration(seconds: float) -> str:
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"


def compile_config(config: ml_collections.ConfigDict, workdir: str,
                   devices: list[Any]) -> dict[str, Any]:
  """--mode=compile on `devices` (target_devices): compiles, prints, writes
  WORKDIR/compile_<topology>.json (or config.compile.output) and returns the result."""
  platform, chip_info = devices[0].platform, chip(devices[0])
  mesh, rules = sharding.make_mesh(config, devices), sharding.logical_rules(config)
  task, state, programs = build_programs(config, mesh, rules, platform)
  cfg = task.model_cfg
  topology = config.compile.topology
  slices = f" x {config.compile.num_slices} slices" if config.compile.num_slices > 1 else ""
  print(f"compile: {topology}{slices}: {len(devices)} x {devices[0].device_kind} "
        f"({_gb(chip_info.hbm_bytes if chip_info else None)} HBM each), mesh "
        f"{dict(mesh.shape)}; model {cfg.family}, {cfg.num_layers} layers, {cfg.dtype}, "
        f"attention {cfg.attention}", flush=True)
  result = {"topology": topology, "num_slices": config.compile.num_slices, "platform": platform,
            "device_kind": devices[0].device_kind, "num_devices": len(devices),
            "num_processes": len({d.process_index for d in devices}),
            "hbm_bytes_per_device": chip_info.hbm_bytes if chip_info else None,
            "mesh": dict(mesh.shape), "family": cfg.family, "dtype": cfg.dtype,
            "attention": cfg.attention, "num_params": _count(state.params),
            "train_batch_size": config.train.batch_size, "eval_batch_size": config.eval.batch_size}
  for name, (jitted, args) in programs.items():
    result[name] = compile_program(jitted, args, chip_info)
    r = result[name]
    if "error" in r:
      print(f"compile: {name}: does not fit ({r['compile_seconds']} s): {r['error']}", flush=True)
      continue
    print(f"compile: {name}: {r['compile_seconds']} s; per device: arguments {_gb(r['argument_bytes'])}, "
          f"temporaries {_gb(r['temp_bytes'])}, outputs {_gb(r['output_bytes'])} "
          f"({_gb(r['alias_bytes'])} of them donated), peak {_gb(r['peak_bytes'])}: "
          f"{'fits' if r['fits'] else 'does not fit' if r['fits'] is False else '?'}", flush=True)
  seq_len, rows = config.data.seq_len, config.train.batch_size
  flops_per_step = rows * seq_len * task.family.flops_per_char(
      cfg, seq_len, task.loss_cfg.intermediate_layers, batch_size=rows)
  result["flops_per_step"] = flops_per_step
  result["roofline"] = roofline(flops_per_step, result["train_step"], devices, config.train.num_steps)
  r = result["roofline"]
  if r is not None:
    print(f"compile: {flops_per_step:.3g} FLOPs per train step; roofline: {r['compute_seconds']:.3g} s "
          f"at peak, {r['hbm_seconds']:.3g} s of HBM traffic: step >= {r['step_seconds']:.3g} s, "
          f"MFU <= {100 * r['mfu']:.0f}%; {r['num_steps']:,} steps >= "
          f"{_duration(r['seconds_to_num_steps'])}", flush=True)
  if config.compile.max_batch:
    result["max_batch_size"] = largest_batch(config, mesh, rules, platform, chip_info)
    print(f"compile: largest global train.batch_size that fits: {result['max_batch_size']}", flush=True)
  path = config.compile.output or os.path.join(workdir, f"compile_{topology.replace(':', '_')}.json")
  files.write_text(path, json.dumps(result, indent=2) + "\n")
  print(f"compile: wrote {path}", flush=True)
  return result


def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
