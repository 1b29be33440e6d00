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
whenever the cache fills). Evaluation is chartx.evaluate.evaluate_bits with config.eval.batch_size
over --eval_windows windows; its rate counts every window as scoring `stride` characters (the
first window of a split scores seq_len, a one-off that would flatter stride 1 on a short run).
Compilation is left out of every number (a first, untimed call compiles). Prints one JSON line.
"""

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

from chartx import evaluate, sample, sharding
from chartx import model as model_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a get_config().")
_SAMPLE_CHARS = flags.DEFINE_integer("sample_chars", 2048, "Characters the cached sampler generates.")
_RECOMPUTE_CHARS = flags.DEFINE_integer("recompute_chars", 0, "Characters the recomputing sampler "
                                        "generates; 0: as many as --sample_chars.")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 1024, "Windows evaluated at each stride.")
flags.mark_flags_as_required(["config"])


def _timed(fn: Callable[[], Any]) -> float:
  fn()  # Compiles.
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def benchmark(config, sample_chars: int, recompute_chars: int, eval_windows: int) -> dict[str, Any]:
  vocab_size = 256
  cfg = model_lib.ModelConfig.from_config(config, vocab_size)
  net = model_lib.Transformer(cfg, deterministic=True)
  seq_len = config.data.seq_len
  params = flax.linen.unbox(jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))
  rng = np.random.default_rng(0)
  sampling = sample.SamplingConfig(temperature=1.0)

  generate = sample.make_generate(sample.model_tokens_to_logits(net), context=seq_len,
                                  num_chars=sample_chars, sampling=sampling)
  prompt_C = rng.integers(0, vocab_size, seq_len).astype(np.int32)
  cache = cfg.init_cache(1, seq_len)
  cached_s = _timed(lambda: generate(params, cache, prompt_C, seq_len, jax.random.key(1)))

  @jax.jit
  def recompute(params, window_C, key):
    def body(i, carry):
      window_C, key, ids_M = carry
      key, draw = jax.random.split(key)
      logits_1xV = net.apply(params, window_C[None], method=model_lib.Transformer.logits)[:, -1]
      next_1 = sample.choose(logits_1xV, draw, sampling)
      return jnp.concatenate([window_C[1:], next_1]), key, ids_M.at[i].set(next_1[0])
    return jax.lax.fori_loop(0, recompute_chars, body,
                             (window_C, key, jnp.zeros(recompute_chars, jnp.int32)))[-1]
  recompute_s = _timed(lambda: recompute(params, prompt_C, jax.random.key(1)))

  mesh = sharding.make_mesh(config)
  score = evaluate.jit_score_fn(evaluate.model_score_fn(net), mesh, sharding.logical_rules(config))
  batch_size = config.eval.batch_size
  eval_rates = {}
  for stride in (1, seq_len):
    # Windows start at 0, S, 2S, ...: eval_windows of them.
    ids_M = rng.integers(0, vocab_size, 1 + seq_len + (eval_windows - 1) * stride).astype(np.int32)
    run = lambda ids_M=ids_M, stride=stride: evaluate.evaluate_bits(
        score, params["params"], ids_M, seq_len=seq_len, stride=stride, batch_size=batch_size, mesh=mesh)
    eval_rates[stride] = eval_windows * stride / _timed(run)
  return {
      "host": platform.node(), "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "jax_version": jax.__version__,
      "num_layers": cfg.num_layers, "d_model": cfg.d_model, "seq_len": seq_len,
      "params": model_lib.count_params(params), "eval_batch_size": batch_size,
      "sample_chars": sample_chars, "recompute_chars": recompute_chars,
      "sample_cached_chars_per_sec": sample_chars / cached_s,
      "sample_recompute_chars_per_sec": recompute_chars / recompute_s,
      "cache_speedup": (sample_chars / cached_s) / (recompute_chars / recompute_s),
      "eval_windows": eval_windows,
      "eval_stride_1_chars_per_sec": eval_rates[1],
      f"eval_stride_{seq_len}_chars_per_sec": eval_rates[seq_len],
      "eval_stride_1_seconds_per_million_chars": 1e6 / eval_rates[1],
  }


def main(argv) -> None:
  del argv
  print(json.dumps(benchmark(_CONFIG.value, _SAMPLE_CHARS.value,
                             _RECOMPUTE_CHARS.value or _SAMPLE_CHARS.value, _EVAL_WINDOWS.value)), flush=True)


if __name__ == "__main__":
  app.run(main)
