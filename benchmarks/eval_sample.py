"""Inference speed: sampling with the KV cache against recomputing the window, and evaluation
characters per second at stride 1 (the paper's protocol) and stride seq_len.

    .venv/bin/python -m benchmarks.eval_sample --config=configs/tiny.py
    .venv/bin/python -m benchmarks.eval_sample --config=configs/enwik8_12l.py \
        --sample_chars=512 --recompute_chars=16 --eval_windows=32

Parameters are random (speed does not depend on them) and the text is random bytes, so no
checkpoint or dataset is needed. Both samplers are one jitted lax.fori_loop over the characters
and start from a prompt of seq_len characters, so the window is full from the first character:
"recompute" runs the full forward pass over the last seq_len characters for every new one;
"cached" is chartx.sample (one position per step, a prefill of the last seq_len // 2 characters
whenever the cache fills). Evaluation is chartx.scoring.evaluate_bits with config.eval.batch_size
over --eval_windows windows; its rate counts every window as scoring `stride` characters (the
first window of a split scores seq_len, a one-off that would flatter stride 1 on a short run).
Compilation is left out of every number (a first, untimed call compiles). Prints one JSON line.
"""

import functools
import json
import platform
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from chartx import sample, scoring, sharding
from chartx.families import fixed, layers, registry


def _timed(fn: Callable[[], Any]) -> float:
  fn()  # Compiles.
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def random_model(config, vocab_size: int = 256) -> tuple[fixed.Transformer, Any]:
  """(net, variables): the deterministic model of config.model with random parameters."""
  cfg = registry.model_config(config, vocab_size)
  net = fixed.Transformer(cfg, deterministic=True)
  tokens_1xT = jnp.zeros((1, config.data.seq_len), jnp.int32)
  return net, flax.linen.unbox(jax.jit(net.init)(jax.random.key(0), tokens_1xT))


def cached_sample_rate(net: fixed.Transformer, variables: Any, seq_len: int, num_chars: int) -> float:
  """Characters per second of chartx.sample's KV-cache sampler from a full seq_len prompt."""
  generate = sample.make_generate(fixed.FAMILY.decoder(net, seq_len).step, context=seq_len,
                                  num_chars=num_chars, sampling=sample.SamplingConfig(temperature=1.0))
  prompt_C = np.random.default_rng(0).integers(0, net.cfg.vocab_size, seq_len).astype(np.int32)
  cache = net.cfg.init_cache(1, seq_len)
  return num_chars / _timed(lambda: generate(variables, cache, prompt_C, seq_len, jax.random.key(1)))


def recompute_sample_rate(net: fixed.Transformer, variables: Any, seq_len: int, num_chars: int) -> float:
  """Characters per second of a sampler that reruns the whole seq_len window for every character."""
  sampling = sample.SamplingConfig(temperature=1.0)

  @jax.jit
  def recompute(variables, window_C, key):
    def body(i, carry):
      window_C, key, ids_M = carry
      key, draw = jax.random.split(key)
      logits_1xV = net.apply(variables, window_C[None], method=fixed.Transformer.logits)[:, -1]
      next_1 = sample.choose(logits_1xV, draw, sampling)
      return jnp.concatenate([window_C[1:], next_1]), key, ids_M.at[i].set(next_1[0])
    return jax.lax.fori_loop(0, num_chars, body, (window_C, key, jnp.zeros(num_chars, jnp.int32)))[-1]

  prompt_C = np.random.default_rng(0).integers(0, net.cfg.vocab_size, seq_len).astype(np.int32)
  return num_chars / _timed(lambda: recompute(variables, prompt_C, jax.random.key(1)))


def eval_rate(config, net: fixed.Transformer, variables: Any, *, stride: int, windows: int,
              batch_size: int) -> float:
  """Characters per second of chartx.scoring.evaluate_bits at `stride` over `windows` windows.

  Every window counts as scoring `stride` characters (the first window of a split scores
  seq_len, a one-off that would flatter stride 1 on a short run).
  """
  seq_len = config.data.seq_len
  mesh = sharding.make_mesh(config)
  score = scoring.jit_score_fn(scoring.model_score_fn(net), mesh, sharding.logical_rules(config))
  # Windows start at 0, S, 2S, ...: `windows` of them.
  ids_M = np.random.default_rng(0).integers(0, net.cfg.vocab_size,
                                            1 + seq_len + (windows - 1) * stride).astype(np.int32)
  run = lambda: scoring.evaluate_bits(score, variables["params"], ids_M, seq_len=seq_len, stride=stride,
                                       batch_size=batch_size, mesh=mesh)
  return windows * stride / _timed(run)


def benchmark(config, sample_chars: int, recompute_chars: int, eval_windows: int) -> dict[str, Any]:
  net, params = random_model(config)
  cfg, seq_len, batch_size = net.cfg, config.data.seq_len, config.eval.batch_size
  cached = cached_sample_rate(net, params, seq_len, sample_chars)
  recomputed = recompute_sample_rate(net, params, seq_len, recompute_chars)
  eval_rates = {stride: eval_rate(config, net, params, stride=stride, windows=eval_windows,
                                  batch_size=batch_size) for stride in (1, seq_len)}
  return {
      "host": platform.node(), "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "jax_version": jax.__version__,
      "num_layers": cfg.num_layers, "d_model": cfg.d_model, "seq_len": seq_len,
      "params": layers.count_params(params), "eval_batch_size": batch_size,
      "sample_chars": sample_chars, "recompute_chars": recompute_chars,
      "sample_cached_chars_per_sec": cached,
      "sample_recompute_chars_per_sec": recomputed,
      "cache_speedup": cached / recomputed,
      "eval_windows": eval_windows,
      "eval_stride_1_chars_per_sec": eval_rates[1],
      f"eval_stride_{seq_len}_chars_per_sec": eval_rates[seq_len],
      "eval_stride_1_seconds_per_million_chars": 1e6 / eval_rates[1],
  }


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, so that importing this module
  (benchmarks.gpu_check does) defines no flags."""
  holders = {
      "config": config_flags.DEFINE_config_file("config", None, "Config file with a get_config()."),
      "sample_chars": flags.DEFINE_integer("sample_chars", 2048, "Characters the cached sampler generates."),
      "recompute_chars": flags.DEFINE_integer("recompute_chars", 0, "Characters the recomputing sampler "
                                              "generates; 0: as many as --sample_chars."),
      "eval_windows": flags.DEFINE_integer("eval_windows", 1024, "Windows evaluated at each stride."),
  }
  flags.mark_flags_as_required(["config"])
  return holders


def main(argv, holders: dict[str, flags.FlagHolder]) -> None:
  del argv
  sample_chars = holders["sample_chars"].value
  print(json.dumps(benchmark(holders["config"].value, sample_chars,
                             holders["recompute_chars"].value or sample_chars,
                             holders["eval_windows"].value)), flush=True)


if __name__ == "__main__":
  _HOLDERS = _define_flags()
  app.run(functools.partial(main, holders=_HOLDERS))
