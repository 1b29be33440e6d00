"""The GPU check: T12, T64 and Transformer-XL 12L in bfloat16 on one accelerator, every number in one JSON file.

    python -m benchmarks.gpu_check --out=DIR/gpu_check.json            # one H100/H200: under 8 minutes
    python -m benchmarks.gpu_check --out=/tmp/gpu_check.json --tiny    # any CPU: about a minute
    bash benchmarks/gpu_check.sh                                       # the lent GPU machine (see there)

For each model (configs/enwik8_12l.py as T12, configs/enwik8_64l.py as T64, configs/enwik8_xl_12l.py
as XL12, with model.dtype bfloat16 and dropout as configured) it measures, each in a section of
its own:
  train/<model>/<attention>  for each --attention choice (model.attention): the train step of
                             chartx.tools.bench.benchmark (all auxiliary losses), so compile time,
                             median step time over --steps after --warmup, chars/s, MFU against the
                             chip's datasheet bf16 peak (chartx.flops.peak_flops) and peak device memory
                             (XL12 with cudnn: cuDNN's kernel with XL's relative positions as its bias);
  infer/<model>              T12, T64: evaluation chars/s at stride 1 (the paper's protocol) and at
                             stride seq_len, over --eval_windows windows in batches of
                             --eval_batch_size, and KV-cache sampling chars/s over --sample_chars
                             (benchmarks.eval_sample's functions), with model.attention "auto" (cuDNN
                             on a GPU in bf16);
                             XL12: at each of the XL paper's attention lengths (XL_LENGTHS), its
                             recurrent evaluation with the cached memory (projected keys and
                             values) and its sampling with it (xl_<length>: benchmarks.xl_eval's
                             xl_rate, segments of 128, a memory of length - 1, same_length, batches
                             of --eval_batch_size streams).
Parameters are random and the text is random bytes: nothing is downloaded.

Every section runs in a child process of its own (python -m benchmarks.gpu_check --section=...),
so that peak_bytes_in_use is that section's alone (JAX cannot reset the peak), and so that a
crash, an out-of-memory or a hung compile loses one section, not the file. Inside a child every
measurement has its own try/except. A failure is recorded as the section's "error" and the
check goes on. Sections start while --budget_s is not spent; a child is stopped when the budget
runs out; the sections that did not run are listed as "skipped".

--tiny shrinks both models (2 layers, d_model 64, seq_len 64, batch 4, 2 steps) and uses float32
where the backend is not a GPU, so the whole check runs in about a minute on a CPU
(tests/test_gpu_check.py). cuDNN attention needs a GPU: on a CPU its sections record the error.

The JSON file: started, finished, elapsed_s, budget_s, tiny, command, argv, cwd, host, versions
(python, jax, jaxlib, flax, optax, orbax-checkpoint, ml-collections, numpy), environment
(XLA_FLAGS ...), nvidia_smi (the GPUs' names, driver, memory and clocks; null without
nvidia-smi), backend, device_kind and num_devices (from the first section that ran), targets
(per model: the MFU target, the best MFU measured, met), sections (name -> {status: ok |
error | skipped, started, seconds, config, overrides, result: the numbers or {error,
traceback}}), errors and skipped (section names). It is rewritten after every section. A line
per section, then a summary, is printed on stdout.
"""

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

MODELS = {"T12": "configs.enwik8_12l", "T64": "configs.enwik8_64l", "XL12": "configs.enwik8_xl_12l"}
XL_LENGTHS = (800, 1800, 2800, 3800)  # The XL paper's attention lengths (--tiny: 32, 64).
ATTENTIONS = ("xla", "cudnn", "auto")
# The MFU targets for one H100/H200 in bfloat16 (docs/results.md, "Not measured yet"); XL12 has none.
MFU_TARGETS = {"T12": 0.40, "T64": 0.45}
TINY = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.d_ff": 256,
        "model.max_len": 64, "data.seq_len": 64, "train.batch_size": 4}
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy")
ENVIRONMENT = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
               "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "PYTHONPATH")
ERROR_CHARS = 2000  # An error string kept in the JSON; a cuDNN or XLA message can run to pages.


class _Parser(argparse.ArgumentParser):
  """argparse whose every complaint is one line, `error: ...`, exit status 1."""

  def error(self, message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line, checked: a bad value exits with one line naming its flag."""
  p = _Parser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="The JSON file to write (its folder is created).")
  p.add_argument("--tiny", action="store_true", help="Tiny dims, float32 off a GPU: a CPU smoke run.")
  p.add_argument("--budget_s", type=float, default=420.0,
                 help="Seconds after which no section starts and a running one is stopped.")
  p.add_argument("--models", default="T12,T64,XL12", help=f"Comma-separated, of {', '.join(MODELS)}.")
  p.add_argument("--attention", default="xla,cudnn",
                 help=f"Comma-separated model.attention choices for the train step, of "
                      f"{', '.join(ATTENTIONS)}.")
  p.add_argument("--steps", type=int, default=None, help="Timed train steps (default 20; --tiny 2).")
  p.add_argument("--warmup", type=int, default=None,
                 help="Untimed steps after compiling (default 3; --tiny 1).")
  p.add_argument("--eval_batch_size", type=int, default=None,
                 help="Windows per eval batch (default 64; --tiny 4).")
  p.add_argument("--eval_windows", type=int, default=None,
                 help="Windows evaluated at each stride (default 4 batches).")
  p.add_argument("--sample_chars", type=int, default=None,
                 help="Characters sampled (default 256; --tiny 16).")
  # Internal: what the parent passes to the child that runs one section.
  p.add_argument("--section", default="", help=argparse.SUPPRESS)
  p.add_argument("--section_out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  defaults = dict(steps=2, warmup=1, eval_batch_size=4, sample_chars=16) if args.tiny else dict(
      steps=20, warmup=3, eval_batch_size=64, sample_chars=256)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.eval_windows is None:
    args.eval_windows = 4 * args.eval_batch_size
  if not args.out or os.path.isdir(args.out):
    p.error(f"--out={args.out!r} must name a file, not a folder")
  if args.budget_s < 0:
    p.error(f"--budget_s must be >= 0, got {args.budget_s}")
  for key, least in (("steps", 1), ("warmup", 0), ("eval_batch_size", 1), ("eval_windows", 1),
                     ("sample_chars", 1)):
    if getattr(args, key) < least:
      p.error(f"--{key} must be >= {least}, got {getattr(args, key)}")
  args.models = _choices(p, "models", args.models, MODELS)
  args.attention = _choices(p, "attention", args.attention, ATTENTIONS)
  if args.section and args.section not in section_names(args):
    p.error(f"--section={args.section!r} is not one of {', '.join(section_names(args))}")
  return args


def _choices(p: _Parser, flag: str, value: str, known: Any) -> list[str]:
  """The names in a comma-separated flag value, each one of `known`."""
  names = [v.strip() for v in value.split(",") if v.strip()]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    p.error(f"--{flag}={value!r}: {unknown[0] if unknown else 'empty'} is not one of {', '.join(known)}")
  return names


def section_names(args: argparse.Namespace) -> list[str]:
  """The sections in the order they run: the train steps first (the MFU targets), then inference."""
  return ([f"train/{m}/{a}" for m in args.models for a in args.attention]
          + [f"infer/{m}" for m in args.models])


# ----------------------------------------------------------------------------- one section (child)

def model_config(model: str, args: argparse.Namespace, backend: str, attention: str) -> tuple[Any, dict]:
  """(config, overrides): the model's paper config with bf16 (or --tiny's dims) and `attention`."""
  config = importlib.import_module(MODELS[model]).get_config()
  overrides: dict[str, Any] = {"model.dtype": "bfloat16", "model.attention": attention}
  if args.tiny:
    overrides.update(TINY)
    if backend != "gpu":  # bf16 matmuls on a CPU are emulated: slow, and not what is checked there.
      overrides["model.dtype"] = "float32"
  overrides["eval.batch_size"] = args.eval_batch_size
  config.update_from_flattened_dict(overrides)
  return config, overrides


def _error(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + " [...]"


def measure(record: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
  """record[key] = fn(), or record[key] = {"error": ...} if it raises: one failure never loses the others."""
  try:
    record[key] = fn()
  except Exception as e:  # pylint: disable=broad-except  # Recorded, whatever it is.
    record[key] = {"error": _error(e), "traceback": traceback.format_exc()[-ERROR_CHARS:]}


def train_section(model: str, attention: str, args: argparse.Namespace) -> dict[str, Any]:
  """chartx.tools.bench.benchmark's record of the model's train step with `attention`."""
  import jax  # pylint: disable=import-outside-toplevel
  from chartx.tools import bench  # pylint: disable=import-outside-toplevel
  config, overrides = model_config(model, args, jax.default_backend(), attention)
  record: dict[str, Any] = {"overrides": overrides}
  measure(record, "result", lambda: bench.benchmark(config, steps=args.steps, warmup=args.warmup))
  return record


def infer_section(model: str, args: argparse.Namespace) -> dict[str, Any]:
  """Evaluation chars/s at stride 1 and seq_len, and KV-cache sampling chars/s, each measured apart."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import eval_sample  # pylint: disable=import-outside-toplevel
  from chartx.families import layers  # pylint: disable=import-outside-toplevel
  from chartx import sharding  # pylint: disable=import-outside-toplevel
  from chartx.tools import bench  # pylint: disable=import-outside-toplevel
  config, overrides = model_config(model, args, jax.default_backend(), "auto")
  seq_len = config.data.seq_len
  record: dict[str, Any] = {"overrides": overrides}
  if config.model.family == "xl":
    record["result"] = xl_infer(config, args)
    return record
  net, variables = eval_sample.random_model(config)
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "params": layers.count_params(variables),
            "seq_len": seq_len, "eval_batch_size": args.eval_batch_size,
            "eval_windows": args.eval_windows, "sample_chars": args.sample_chars}
  for stride in (1, seq_len):
    measure(result, f"eval_stride_{stride}_chars_per_sec", lambda stride=stride: eval_sample.eval_rate(
        config, net, variables, stride=stride, windows=args.eval_windows, batch_size=args.eval_batch_size))
  measure(result, "sample_cached_chars_per_sec",
          lambda: eval_sample.cached_sample_rate(net, variables, seq_len, args.sample_chars))
  result["peak_memory_bytes"], result["peak_memory_source"] = bench.peak_memory()
  record["result"] = result
  return record


def xl_infer(config: Any, args: argparse.Namespace) -> dict[str, Any]:
  """Transformer-XL's recurrent evaluation and sampling with the cached memory, at each attention
  length (benchmarks.xl_eval.xl_rate, which builds configs/enwik8_xl_12l.py's model itself)."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import xl_eval  # pylint: disable=import-outside-toplevel
  from chartx import sharding  # pylint: disable=import-outside-toplevel
  from chartx.tools import bench  # pylint: disable=import-outside-toplevel
  xl_args = argparse.Namespace(tiny=args.tiny, segment=8 if args.tiny else 128,
                               batch_size=args.eval_batch_size, min_seconds=0.0 if args.tiny else 2.0,
                               sample_chars=args.sample_chars)
  mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
  lengths = (32, 64) if args.tiny else XL_LENGTHS
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "lengths": list(lengths), "segment": xl_args.segment,
            "streams": xl_args.batch_size, "sample_chars": args.sample_chars}
  for length in lengths:
    measure(result, f"xl_{length}", lambda length=length: xl_eval.xl_rate(length, xl_args, mesh, rules))
  result["peak_memory_bytes"], result["peak_memory_source"] = bench.peak_memory()
  return result


def run_section(args: argparse.Namespace) -> None:
  """The child: runs args.section and writes its record to args.section_out."""
  kind, model, *rest = args.section.split("/")
  record: dict[str, Any] = {}
  measure(record, "section", lambda: (train_section(model, rest[0], args) if kind == "train"
                                      else infer_section(model, args)))
  section = record["section"]
  if "error" in section:  # The section's setup failed before its measurements.
    section = {"result": section}
  with open(args.section_out, "w", encoding="utf-8") as f:
    json.dump(section, f, default=repr)


# ----------------------------------------------------------------------------- the check (parent)

def _child_argv(args: argparse.Namespace, section: str, section_out: str) -> list[str]:
  argv = [sys.executable, "-m", "benchmarks.gpu_check", f"--out={args.out}", f"--budget_s={args.budget_s}",
          f"--models={','.join(args.models)}", f"--attention={','.join(args.attention)}",
          f"--steps={args.steps}", f"--warmup={args.warmup}", f"--eval_batch_size={args.eval_batch_size}",
          f"--eval_windows={args.eval_windows}", f"--sample_chars={args.sample_chars}",
          f"--section={section}", f"--section_out={section_out}"]
  return argv + (["--tiny"] if args.tiny else [])


def run_child(args: argparse.Namespace, section: str, timeout_s: float) -> dict[str, Any]:
  """One section in its own process; a crash or a timeout becomes the section's error."""
  with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
    section_out = os.path.join(tmp, "section.json")
    try:
      done = subprocess.run(_child_argv(args, section, section_out), capture_output=True, text=True,
                            timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
      return {"result": {"error": f"stopped after {timeout_s:.0f} s: the budget "
                                  f"(--budget_s={args.budget_s:g}) ran out"}}
    if not os.path.exists(section_out):
      tail = (done.stderr or done.stdout)[-ERROR_CHARS:]
      return {"result": {"error": f"the section's process exited with status {done.returncode} "
                                  f"and no result: {tail}"}}
    with open(section_out, encoding="utf-8") as f:
      record = json.load(f)
  return record


def _versions() -> dict[str, str | None]:
  """Installed versions, read from package metadata (importing JAX here would take the GPU's memory)."""
  versions: dict[str, str | None] = {"python": platform.python_version()}
  for name in VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _nvidia_smi() -> str | None:
  """The GPUs as nvidia-smi names them (SXM or NVL decides the datasheet peak), or None without it."""
  if shutil.which("nvidia-smi") is None:
    return None
  try:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
    return subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True,
                          timeout=30, check=False).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    return _error(e)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_check(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
  """Runs every section within the budget, writes args.out after each, and returns the report."""
  start = time.monotonic()
  report: dict[str, Any] = {
      "started": _now(), "finished": None, "elapsed_s": None, "budget_s": args.budget_s,
      "tiny": args.tiny, "command": shlex.join(["python", "-m", "benchmarks.gpu_check", *argv]),
      "argv": argv, "cwd": os.getcwd(), "host": platform.node(), "versions": _versions(),
      "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
      "nvidia_smi": _nvidia_smi(),
      "backend": None, "device_kind": None, "num_devices": None, "targets": {},
      "sections": {}, "errors": [], "skipped": []}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  for section in section_names(args):
    remaining = args.budget_s - (time.monotonic() - start)
    kind, model, *rest = section.split("/")
    entry: dict[str, Any] = {"config": MODELS[model].replace(".", "/") + ".py"}
    if remaining <= 0:
      entry.update(status="skipped", reason=f"the budget (--budget_s={args.budget_s:g}) was spent")
      report["skipped"].append(section)
    else:
      began = time.monotonic()
      entry["started"] = _now()
      # At least 30 s, so that the last section started is not stopped at once.
      record = run_child(args, section, max(remaining, 30.0))
      entry["seconds"] = round(time.monotonic() - began, 2)
      entry.update(record)
      failed = _failures(record)
      entry["status"] = "error" if failed else "ok"
      if failed:
        report["errors"].append(section)
      result = record.get("result", {})
      if report["backend"] is None and "backend" in result:
        report.update({k: result[k] for k in ("backend", "device_kind", "num_devices")})
    report["sections"][section] = entry
    _write(args.out, report)
    print(summary_line(section, entry), flush=True)
  report["targets"] = targets(report["sections"], args.models)
  report["finished"], report["elapsed_s"] = _now(), round(time.monotonic() - start, 2)
  _write(args.out, report)
  return report


def targets(sections: dict[str, Any], models: list[str]) -> dict[str, Any]:
  """Per model: the MFU target, the best MFU over the attention choices that ran, whether it is met
  (null where no MFU was measured: a CPU, or every choice failed)."""
  out = {}
  for model in models:
    mfus = [s["result"]["mfu"] for name, s in sections.items()
            if name.startswith(f"train/{model}/") and s["status"] == "ok" and s["result"].get("mfu")]
    best = max(mfus, default=None)
    if model in MFU_TARGETS:
      out[model] = {"mfu_target": MFU_TARGETS[model], "mfu_best": best,
                    "met": None if best is None else best >= MFU_TARGETS[model]}
  return out


def _failures(record: dict[str, Any]) -> list[str]:
  """The keys of record's result that hold an error instead of a measurement ("result": all of it)."""
  result = record.get("result", {})
  if "error" in result:
    return ["result"]
  return [k for k, v in result.items() if isinstance(v, dict) and "error" in v]


def _write(path: str, report: dict[str, Any]) -> None:
  """Written whole after every section (to a temporary file, then renamed): a stopped run keeps the rest."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, default=repr)
    f.write("\n")
  os.replace(tmp, path)


def _num(value: Any, fmt: str) -> str:
  return format(value, fmt) if isinstance(value, (int, float)) else "-"


def summary_line(section: str, entry: dict[str, Any]) -> str:
  """One line per section for the human reading the log."""
  if entry["status"] == "skipped":
    return f"{section:<16} skipped: {entry['reason']}"
  result = entry.get("result", {})
  if "error" in result:
    return f"{section:<16} error: {result['error'].splitlines()[0][:200]}"
  if section.startswith("train/"):
    mfu = result.get("mfu")
    return (f"{section:<16} compile {_num(result.get('compile_total_s'), '.1f')} s, "
            f"step {_num(1e3 * result.get('step_time_s', float('nan')), '.2f')} ms, "
            f"{_num(result.get('chars_per_sec'), ',.0f')} chars/s, "
            f"MFU {'-' if mfu is None else format(100 * mfu, '.1f') + '%'}, "
            f"peak {_num(result.get('peak_memory_bytes', 0) / 2**30, '.2f')} GiB")
  parts, seq_len = [], result.get("seq_len")
  if "lengths" in result:  # Transformer-XL's, at each attention length.
    for length in result["lengths"]:
      rec = result.get(f"xl_{length}", {})
      parts.append(f"at {length}: error" if "error" in rec else
                   f"at {length}: eval {_num(rec.get('xl_chars_per_sec'), ',.0f')}, "
                   f"sample {_num(rec.get('xl_sample_chars_per_sec'), ',.0f')} chars/s")
    return f"{section:<16} " + ", ".join(parts)
  for key, label in (("eval_stride_1_chars_per_sec", "eval stride 1"),
                     (f"eval_stride_{seq_len}_chars_per_sec", f"eval stride {seq_len}"),
                     ("sample_cached_chars_per_sec", "sample")):
    value = result.get(key)
    parts.append(f"{label} " + (f"{value:,.0f} chars/s" if isinstance(value, float) else "error"))
  return f"{section:<16} " + ", ".join(parts)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  if args.section:
    run_section(args)
    return
  report = run_check(args, argv)
  for model, target in report["targets"].items():
    if target["mfu_best"] is not None:
      print(f"{model}: best MFU {100 * target['mfu_best']:.1f}%, target {100 * target['mfu_target']:.0f}%"
            f" ({'met' if target['met'] else 'not met'})")
  print(f"gpu_check: {report['device_kind']} ({report['backend']}), jax {report['versions']['jax']}, "
        f"{report['elapsed_s']:.0f} s of a {args.budget_s:g} s budget; {len(report['errors'])} sections "
        f"with errors, {len(report['skipped'])} skipped; wrote {args.out}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
