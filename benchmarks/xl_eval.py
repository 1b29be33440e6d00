"""Evaluation speed at equal attention length: Transformer-XL's recurrent protocol against the
fixed-context model's stride-1 sliding window (the XL paper reports 363x at 800, 773x at 1,800,
1,409x at 2,800 and 1,874x at 3,800 on its hardware).

    python -m benchmarks.xl_eval                   # 12 layers, d_model 512: T12 against XL 12L
    python -m benchmarks.xl_eval --tiny            # 2 layers, d_model 32: seconds (tests/test_xl.py)
    python -m benchmarks.xl_eval --lengths=800 --batch_size=2 --min_seconds=20

For each attention length A (--lengths), both models see A characters for every scored one:
  fixed  configs/enwik8_12l.py's model (T12) with positional tables of A rows, scoring windows of
         A characters at stride 1 (the paper's protocol: one forward pass of A positions per
         character), as chartx.evaluate's sliding window does, --batch_size windows per call;
  xl     configs/enwik8_xl_12l.py's model (12 layers, d_model 512, relative positions) scoring
         segments of --segment characters with a memory of A - 1 and same_length, so every
         character sees itself and the A - 1 before it, as chartx.evaluate's recurrent protocol
         does (its memory an xl.Cache: keys and values projected once), --batch_size streams per call.
Parameters are random and the text is random bytes (speed does not depend on them); the cost of a
call depends on its shapes only, so the memory is not filled first. With --sample_chars, each
model also samples that many characters per call with chartx.sample: the fixed model with its
KV cache from a prompt of A characters, XL with a memory (xl.Cache) of A - 1, made afresh in
each call (its relative keys projected once per call). Each call is compiled by an untimed
call. XL and the fixed model are then timed in turn, in ROUNDS rounds (XL first, then the fixed
model, the order swapped each round), each repeating its call for --min_seconds / ROUNDS (at
least once): a slow spell of a shared machine then falls on both sides of a round. Each rate is
the median of its rounds' characters per second, each XL / fixed ratio the median of the
rounds' ratios (the rounds' ratios are in the JSON). It evaluates as python -m chartx.main
--mode=eval does: with chartx.malloc's settings (freed memory kept for reuse, where they apply)
and, on a CPU-only host, one XLA device per core (chartx.cpu_devices), each scoring its share of
the batch; sampling decodes one row on one device, as --mode=sample does. (On one device of 2
cores, XL's many small ops per segment ran 1.5 times slower in some minutes than in others, the
fixed model's large matmuls did not; split over the cores XL held its pace: docs/results.md.)
Prints a JSON line per length and, at the end, a markdown table with the machine and the
1-minute load averages before and after.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from chartx import cpu_devices, malloc, sample, scoring, sharding
from chartx.families import base, layers, registry, xl
from configs import enwik8_12l, enwik8_xl_12l

TINY = {"num_layers": 2, "d_model": 32, "num_heads": 2, "d_ff": 64}


class _Parser(argparse.ArgumentParser):
  """argparse whose every complaint is one line, `error: ...`, exit status 1."""

  def error(self, message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="python -m benchmarks.xl_eval", description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="2 layers, d_model 32, lengths 32,64: seconds.")
  p.add_argument("--lengths", default=None, help="Comma-separated attention lengths "
                 "(default 800,1800,2800,3800: the XL paper's; --tiny 32,64).")
  p.add_argument("--segment", type=int, default=None, help="XL's segment length (default 128; --tiny 8).")
  p.add_argument("--batch_size", type=int, default=None,
                 help="Windows (fixed) and streams (XL) per call (default 4; --tiny 2).")
  p.add_argument("--min_seconds", type=float, default=None,
                 help="Seconds each measurement repeats its call for (default 10; --tiny 0).")
  p.add_argument("--sample_chars", type=int, default=None,
                 help="Characters each sampler generates per call (default 256; --tiny 32; 0: no sampling).")
  args = p.parse_args(argv)
  defaults = (dict(lengths="32,64", segment=8, batch_size=2, min_seconds=0.0, sample_chars=32) if args.tiny
              else dict(lengths="800,1800,2800,3800", segment=128, batch_size=4, min_seconds=10.0,
                        sample_chars=256))
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  try:
    args.lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
  except ValueError:
    p.error(f"--lengths={args.lengths!r} must be comma-separated integers")
  if not args.lengths or min(args.lengths) < 2:
    p.error(f"--lengths must be attention lengths >= 2, got {args.lengths}")
  for key in ("segment", "batch_size"):
    if getattr(args, key) < 1:
      p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
  if args.min_seconds < 0:
    p.error(f"--min_seconds must be >= 0, got {args.min_seconds}")
  if args.sample_chars < 0:
    p.error(f"--sample_chars must be >= 0, got {args.sample_chars}")
  return args


def _config(module: Any, tiny: bool) -> Any:
  config = module.get_config()
  config.data.name = "text_files"  # Bytes: 256 symbols, no dataset to read.
  config.model.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  config.model.dropout = 0.0
  if tiny:
    config.model.update(TINY)
  return config


ROUNDS = 3
# A side's measurement: its call and the characters it scores or generates.
Timed = tuple[Callable[[], Any], int]


def _rate(call: Callable[[], Any], chars_per_call: int, min_seconds: float) -> tuple[float, int]:
  """(characters per second, calls): calls until min_seconds have passed, at least one."""
  calls, start = 0, time.perf_counter()
  while True:
    jax.block_until_ready(call())
    calls += 1
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
      return calls * chars_per_call / elapsed, calls


def paired(xl_side: Timed, fixed_side: Timed, min_seconds: float) -> tuple[float, float, list[float], dict[str, int]]:
  """(XL's characters per second, the fixed model's, XL / fixed of each round, each side's timed
  calls): each call compiled by an untimed one, then ROUNDS rounds of both in turn."""
  for call, _ in (xl_side, fixed_side):
    jax.block_until_ready(call())
  rates: dict[str, list[float]] = {"xl": [], "fixed": []}
  calls = {"xl": 0, "fixed": 0}
  for round_ in range(ROUNDS):
    order = (("xl", xl_side), ("fixed", fixed_side))
    for name, (call, chars) in order if round_ % 2 == 0 else order[::-1]:
      rate, timed = _rate(call, chars, min_seconds / ROUNDS)
      rates[name].append(rate)
      calls[name] += timed
  ratios = [x / f for x, f in zip(rates["xl"], rates["fixed"])]
  return statistics.median(rates["xl"]), statistics.median(rates["fixed"]), ratios, calls


def fixed_calls(length: int, args: argparse.Namespace, mesh, rules) -> tuple[dict[str, Any], Timed, Timed | None]:
  """(record, eval, sampling): the fixed model's stride-1 sliding window over windows of
  `length` characters, and its KV-cache sampler."""
  config = _config(enwik8_12l, args.tiny)
  config.data.seq_len = config.model.max_len = length
  cfg = registry.model_config(config, 256)
  net = registry.build(cfg)
  init = lambda r: registry.get(cfg.family).init_params(net, r, length)
  params = flax.linen.unbox(jax.jit(init)(jax.random.key(0)))
  score = scoring.jit_score_fn(scoring.model_score_fn(net), mesh, rules)
  rng = np.random.default_rng(0)
  windows_BxS = rng.integers(0, 256, (args.batch_size, length + 1)).astype(np.int32)
  first_B = np.full(args.batch_size, length - 1, np.int32)  # Stride 1: the last target only.
  evaluation = (lambda: score(params, windows_BxS, first_B), args.batch_size)
  sampling = None
  if args.sample_chars:
    # chartx.sample's KV-cache sampler from a full prompt of `length` characters (it re-encodes
    # the last length / 2 whenever the cache fills).
    generate = sample.make_generate(registry.get(cfg.family).decoder(net, length).step, context=length,
                                    num_chars=args.sample_chars, sampling=sample.SamplingConfig())
    prompt_C = rng.integers(0, 256, length).astype(np.int32)
    sampling = (lambda: generate({"params": params}, cfg.init_cache(1, length), prompt_C, length,
                                 jax.random.key(1)), args.sample_chars)
  return {"fixed_params": layers.count_params(params)}, evaluation, sampling


def xl_calls(length: int, args: argparse.Namespace, mesh, rules) -> tuple[dict[str, Any], Timed, Timed | None]:
  """(record, eval, sampling): XL's recurrent protocol, segments of args.segment with a memory of
  length - 1 and same_length, and its recurrent sampler."""
  config = _config(enwik8_xl_12l, args.tiny)
  config.data.seq_len = args.segment  # XL has no positional table: no max_len to match.
  cfg = dataclasses.replace(registry.model_config(config, 256), mem_len=length - 1,
                            same_length=True)
  net = registry.build(cfg)
  params = flax.linen.unbox(jax.jit(lambda r: xl.FAMILY.init_params(net, r, args.segment))(jax.random.key(0)))
  protocol = base.Recurrent(seq_len=args.segment, stride=args.segment, mem_len=length - 1, same_length=True)
  _, memory_shardings, empty_memory = protocol.empty_memory(xl.FAMILY, net, mesh, rules, args.batch_size,
                                                            params)
  score = scoring.jit_segment_score_fn(scoring.model_segment_score_fn(net), memory_shardings,
                                        mesh, rules)
  rng = np.random.default_rng(0)
  inputs_BxT, targets_BxT = (rng.integers(0, 256, (args.batch_size, args.segment)).astype(np.int32)
                             for _ in range(2))
  mask_BxT = np.ones((args.batch_size, args.segment), bool)
  state = {"memory": empty_memory(params)}

  def call():
    nats, count, state["memory"] = score(params, state["memory"], inputs_BxT, targets_BxT, mask_BxT)
    return nats, count
  evaluation = (call, args.batch_size * args.segment)
  sampling = None
  if args.sample_chars:
    # chartx.sample's recurrent sampler: one position with the memory per character (its cost
    # does not depend on how full the memory is, so a one-character prompt times the same).
    generate = sample.make_recurrent_generate(xl.FAMILY.decoder(net, 0), num_chars=args.sample_chars,
                                              sampling=sample.SamplingConfig())
    prompt_C = np.zeros(64, np.int32)
    sampling = (lambda: generate({"params": params}, prompt_C, 1, jax.random.key(1)), args.sample_chars)
  return {"xl_params": layers.count_params(params), "xl_mem_len": length - 1}, evaluation, sampling


def xl_rate(length: int, args: argparse.Namespace, mesh, rules) -> dict[str, Any]:
  """XL alone (benchmarks/gpu_check.py): xl_calls' record with its evaluation's and sampling's
  characters per second, each compiled by an untimed call, then timed for args.min_seconds."""
  record, evaluation, sampling = xl_calls(length, args, mesh, rules)
  for key, side in (("xl_chars_per_sec", evaluation), ("xl_sample_chars_per_sec", sampling)):
    if side is not None:
      call, chars = side
      jax.block_until_ready(call())
      record[key], _ = _rate(call, chars, args.min_seconds)
  return record


def _mesh_config(args: argparse.Namespace) -> Any:
  """A config for the mesh and for cpu_devices (which reads no backend): the default mesh (every
  device on the data axis), the benchmark's batch as its batch sizes."""
  config = enwik8_12l.get_config()
  config.train.batch_size = config.eval.batch_size = args.batch_size
  return config


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
  config = _mesh_config(args)
  mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
  records = []
  for length in args.lengths:
    record = {"attention_length": length, "segment": args.segment, "batch_size": args.batch_size,
              "load_avg_before": os.getloadavg()[0]}
    xl_record, xl_eval, xl_sample = xl_calls(length, args, mesh, rules)
    fixed_record, fixed_eval, fixed_sample = fixed_calls(length, args, mesh, rules)
    record.update(xl_record, **fixed_record)
    (record["xl_chars_per_sec"], record["fixed_chars_per_sec"], rounds,
     calls) = paired(xl_eval, fixed_eval, args.min_seconds)
    record["xl_calls"], record["fixed_calls"] = calls["xl"], calls["fixed"]
    record["xl_over_fixed_rounds"] = rounds
    record["xl_over_fixed"] = statistics.median(rounds)
    if args.sample_chars:
      (record["xl_sample_chars_per_sec"], record["fixed_sample_chars_per_sec"], rounds,
       _) = paired(xl_sample, fixed_sample, args.min_seconds)
      record["xl_over_fixed_sample_rounds"] = rounds
      record["xl_over_fixed_sample"] = statistics.median(rounds)
    record["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(record), flush=True)
    records.append(record)
  return records


def table(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
  lines = [f"{jax.devices()[0].device_kind} x {jax.device_count()} ({platform.machine()}, "
           f"{os.cpu_count()} CPUs), jax "
           f"{jax.__version__}; {'tiny models' if args.tiny else 'T12 (fixed) against XL 12L'}, "
           f"XL segments of {args.segment}, batch {args.batch_size}",
           "",
           "| attention length | eval: fixed, stride 1 (chars/s) | eval: XL, recurrent (chars/s) "
           "| XL / fixed (rounds) | sampling: fixed, KV cache (chars/s) | sampling: XL, memory (chars/s) "
           "| XL / fixed, sampling (rounds) | load avg |",
           "|---|---|---|---|---|---|---|---|"]
  number = lambda r, key, fmt: format(r[key], fmt) if key in r else "-"
  ratio = lambda r, key, fmt: (f"{r[key]:{fmt}}x ({min(r[key + '_rounds']):{fmt}}-{max(r[key + '_rounds']):{fmt}})"
                               if key in r else "-")
  for r in records:
    lines.append(f"| {r['attention_length']:,} | {r['fixed_chars_per_sec']:,.2f} | "
                 f"{r['xl_chars_per_sec']:,.0f} | {ratio(r, 'xl_over_fixed', ',.0f')} | "
                 f"{number(r, 'fixed_sample_chars_per_sec', ',.1f')} | "
                 f"{number(r, 'xl_sample_chars_per_sec', ',.1f')} | {ratio(r, 'xl_over_fixed_sample', ',.2f')} | "
                 f"{r['load_avg_before']:.2f}-{r['load_avg_after']:.2f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  malloc.keep_freed_memory()  # As chartx.main's evaluation does, before JAX allocates.
  cpu_devices.split_cores(_mesh_config(args), "eval")  # Before JAX's backend starts.
  records = benchmark(args)
  print(table(records, args), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
