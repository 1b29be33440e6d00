"""Transformer-XL (chartx/families/xl.py): the memory is exact and stop-gradient, the relative shift is the
direct computation, causality through gradients, generation with a memory, config errors."""

import dataclasses
import math
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chartx import losses
from chartx.families import fixed, layers, registry, xl
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CFG = layers.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, d_ff=64,
                             num_targets=2, family="xl", mem_len=8, dtype="float32", attention="xla")


def _cfg(**changes) -> layers.ModelConfig:
  return dataclasses.replace(_CFG, **changes)


def _params(cfg, seed=0):
  tokens_1xT = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(registry.build(cfg).init)  # One compile, where eager init compiles every op.
  return flax.linen.unbox(init(jax.random.key(seed), tokens_1xT)["params"])


def _unstack(params, num_layers):
  """The scanned parameter tree in the unrolled layout (layers_0, layers_1, ...)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for layer in range(num_layers):
    out[f"layers_{layer}"] = jax.tree.map(lambda p, layer=layer: p[layer], params["layers"]["block"])
  return out


def _logits_fn(cfg):
  """jit((params, tokens_BxT, memory) -> (logits_BxTxV, new memory)) of the deterministic model."""
  model = registry.build(cfg)
  return jax.jit(lambda params, tokens, memory: model.apply({"params": params}, tokens, memory,
                                                            method="logits"))


def _tokens(shape, seed=1, low=0, high=64):
  return jax.random.randint(jax.random.key(seed), shape, low, high)


def _memory(cfg, batch, valid, seed=5):
  """A memory of random states (not what a model would leave: enough to test masking)."""
  h = jax.random.normal(jax.random.key(seed), (cfg.num_layers, batch, cfg.mem_len, cfg.d_model))
  return xl.Memory(h_LxBxMxD=h.astype(cfg.compute_dtype), valid_B=jnp.asarray(valid, jnp.int32))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_segment_with_memory_equals_one_forward_pass(scan_layers):
  """mem_len >= seq_len: segment 2's logits with segment 1's memory are those of one pass over
  1 + 2; the memory of a fresh start has mem_len - T padding rows in front (mem_len 12 > T 8)."""
  cfg = _cfg(mem_len=12)
  params = _params(cfg)
  if not scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=False)
    params = _unstack(params, cfg.num_layers)
  logits = _logits_fn(cfg)
  tokens_BxT = _tokens((3, 16))
  full_BxTxV, _ = logits(params, tokens_BxT, None)
  first_BxTxV, memory = logits(params, tokens_BxT[:, :8], xl.init_memory(cfg, 3))
  assert memory.h_LxBxMxD.shape == (2, 3, 12, 32)
  np.testing.assert_array_equal(memory.valid_B, [8, 8, 8])
  second_BxTxV, memory = logits(params, tokens_BxT[:, 8:], memory)
  np.testing.assert_array_equal(memory.valid_B, [12, 12, 12])
  np.testing.assert_allclose(first_BxTxV, full_BxTxV[:, :8], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(second_BxTxV, full_BxTxV[:, 8:], rtol=1e-5, atol=1e-5)
  # Without the memory, segment 2 would differ: the test above is not vacuous.
  alone_BxTxV, _ = logits(params, tokens_BxT[:, 8:], xl.init_memory(cfg, 3))
  assert np.abs(alone_BxTxV - full_BxTxV[:, 8:]).max() > 1e-2


def test_new_memory_holds_every_layers_input():
  """Layer 0's memory rows are the embedded characters; layer 1's the output of layer 0."""
  cfg = _cfg(mem_len=6)
  params = _params(cfg)
  model = registry.build(cfg, all_layers=True)
  tokens_BxT = _tokens((2, 4))
  memory = _memory(cfg, 2, [6, 1])
  h_LxBxTxD, new = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))(params, tokens_BxT, memory)
  assert h_LxBxTxD.shape == (2, 2, 4, 32)
  np.testing.assert_array_equal(new.valid_B, [6, 5])
  np.testing.assert_array_equal(new.h_LxBxMxD[:, :, :2], memory.h_LxBxMxD[:, :, 4:])  # Oldest first.
  np.testing.assert_array_equal(new.h_LxBxMxD[0, :, 2:], params["embedding"][tokens_BxT])
  np.testing.assert_allclose(new.h_LxBxMxD[1, :, 2:], h_LxBxTxD[0], rtol=1e-6)


def test_no_gradient_reaches_the_memory_or_the_segment_that_made_it():
  """The loss of segment 2 has exactly zero gradient with respect to the memory it reads, and to
  the embeddings of segment 1's characters (a vocabulary half of their own), which reach it
  only through that memory; segment 2's own characters' embeddings do get a gradient."""
  cfg = _cfg()
  params = _params(cfg)
  model = registry.build(cfg)
  first_BxT, second_BxT = _tokens((2, 8), seed=1, high=32), _tokens((2, 8), seed=2, low=32)

  def second_loss(params, memory_h):
    _, memory = model.apply({"params": params}, first_BxT, xl.init_memory(cfg, 2), method="logits")
    memory = memory.replace(h_LxBxMxD=memory.h_LxBxMxD + memory_h)
    logits_BxTxV, _ = model.apply({"params": params}, second_BxT, memory, method="logits")
    return logits_BxTxV.sum()

  zeros = jnp.zeros((2, 2, cfg.mem_len, 32))
  grad_params, grad_memory = jax.jit(jax.grad(second_loss, argnums=(0, 1)))(params, zeros)
  assert np.all(np.asarray(grad_memory) == 0.0)
  embedding_grad_VxD = np.asarray(grad_params["embedding"])
  assert np.all(embedding_grad_VxD[:32] == 0.0)
  assert np.abs(embedding_grad_VxD[32:]).sum() > 0
  # And the memory does change segment 2's logits (so the zero is the stop_gradient's doing).
  noise = jax.random.normal(jax.random.key(3), zeros.shape)
  memory_changes = jax.jit(lambda p: second_loss(p, zeros) - second_loss(p, noise))(params)
  assert abs(float(memory_changes)) > 1e-3


def _direct_encoding(distance: int, d_model: int) -> np.ndarray:
  frequencies = 1.0 / 10000 ** (np.arange(0, d_model, 2) / d_model)
  return np.concatenate([np.sin(distance * frequencies), np.cos(distance * frequencies)])


@pytest.mark.parametrize("clamp_len,window,valid", [(0, None, [4, 4]), (3, None, [4, 1]),
                                                    (0, 5, [4, 2]), (2, 4, [0, 3])])
def test_relative_shift_equals_the_direct_computation(clamp_len, window, valid):
  """relative_attention (pad-and-reshape shift, masks) against a direct loop over every
  (query, key) pair: score = ((q + u) k + (q + v) W_R R(min(d, clamp))) / sqrt(H), d = M + i - j,
  seen when 0 <= d, d <= window (same_length) and j is a valid memory row or in the segment."""
  B, T, M, N, H, D = 2, 5, 4, 2, 3, 8
  C = M + T
  keys = iter(jax.random.split(jax.random.key(0), 8))
  q, k, value = (np.asarray(jax.random.normal(next(keys), shape))
                 for shape in ((B, T, N, H), (B, C, N, H), (B, C, N, H)))
  w_r_DxNxH, u_NxH, v_NxH = (np.asarray(jax.random.normal(next(keys), shape))
                             for shape in ((D, N, H), (N, H), (N, H)))
  r_CxD = xl.relative_encodings(C, D, clamp_len)
  rk_CxNxH = np.einsum("cd,dnh->cnh", np.asarray(r_CxD), w_r_DxNxH)
  mask = xl.attention_mask(T, M, jnp.asarray(valid, jnp.int32), window)
  out = xl.relative_attention(*map(jnp.asarray, (q, k, value, rk_CxNxH, u_NxH, v_NxH)), mask)

  expected = np.zeros((B, T, N, H))
  for b in range(B):
    for i in range(T):
      seen = [j for j in range(C) if 0 <= M + i - j and (window is None or M + i - j <= window)
              and j >= M - valid[b]]
      np.testing.assert_array_equal(np.asarray(mask[b, 0, i]), np.isin(np.arange(C), seen))
      for n in range(N):
        scores = []
        for j in seen:
          d = M + i - j
          r_D = _direct_encoding(min(d, clamp_len) if clamp_len else d, D)
          scores.append(((q[b, i, n] + u_NxH[n]) @ k[b, j, n]
                         + (q[b, i, n] + v_NxH[n]) @ (r_D @ w_r_DxNxH[:, n])) / math.sqrt(H))
        p = np.exp(np.asarray(scores) - max(scores))
        expected[b, i, n] = (p / p.sum()) @ value[b, seen, n]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_relative_shift_moves_row_i_by_t_minus_1_minus_i():
  T, C = 3, 7
  x_1x1xTxC = jnp.arange(T * C, dtype=jnp.float32).reshape(1, 1, T, C)
  shifted = np.asarray(xl.relative_shift(x_1x1xTxC))[0, 0]
  for i in range(T):
    for j in range(C - T + i + 1):  # The entries a query can see.
      assert shifted[i, j] == x_1x1xTxC[0, 0, i, j + T - 1 - i]


def test_every_head_is_causal_through_gradients():
  """d (layer l's head k logits at t) / d (input embedding at t') = 0 exactly for t' > t and not
  all zero for t' <= t, with a memory of valid and invalid rows. Each position has a character
  of its own, so an embedding row's gradient is that position's."""
  cfg = _cfg(mem_len=4)
  params = _params(cfg)
  model = registry.build(cfg, all_layers=True)
  T, t = 10, 4
  tokens_1xT = jnp.arange(T)[None]
  memory = _memory(cfg, 1, [3])

  def head_outputs_LxK(params):
    h_LxBxTxD, _ = model.apply({"params": params}, tokens_1xT, memory)
    heads = model.apply({"params": params}, method="heads")
    return jnp.stack([jnp.stack([heads.layer(layer).logits(cfg, h_LxBxTxD[layer], target)[0, t].sum()
                                 for target in range(cfg.num_targets)])
                      for layer in range(cfg.num_layers)])

  embed_grad_LxKxVxD = np.asarray(jax.jit(jax.jacrev(head_outputs_LxK))(params)["embedding"])
  for layer in range(cfg.num_layers):
    for target in range(cfg.num_targets):
      grad_VxD = embed_grad_LxKxVxD[layer, target]
      assert np.all(grad_VxD[t + 1:T] == 0.0), (layer, target)
      assert np.abs(grad_VxD[:t + 1]).sum(-1).min() > 0, (layer, target)


def test_generation_one_character_at_a_time_equals_the_full_forward():
  """T = 1 steps with a memory: with mem_len >= the text, the full forward's logits at every
  step; with a shorter memory W, those of the full forward in which every layer sees the last
  W + 1 positions (same_length with mem_len W and no memory), as do segments of 4 with same_length."""
  text_1xT = _tokens((1, 12))
  for mem_len in (12, 5):
    cfg = _cfg(mem_len=mem_len)
    params = _params(cfg)
    step = _logits_fn(cfg)
    banded = _logits_fn(dataclasses.replace(cfg, same_length=True))
    expected_1xTxV, _ = (step if mem_len >= 12 else banded)(params, text_1xT, None)
    memory, stepped = xl.init_memory(cfg, 1), []
    for t in range(12):
      logits_1x1xV, memory = step(params, text_1xT[:, t:t + 1], memory)
      stepped.append(logits_1x1xV)
    np.testing.assert_allclose(jnp.concatenate(stepped, 1), expected_1xTxV, rtol=1e-5, atol=1e-5)
  memory, segments = xl.init_memory(cfg, 1), []
  for start in range(0, 12, 4):
    logits_1xTxV, memory = banded(params, text_1xT[:, start:start + 4], memory)
    segments.append(logits_1xTxV)
  np.testing.assert_allclose(jnp.concatenate(segments, 1), expected_1xTxV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers,same_length,clamp_len", [(True, True, 3), (False, False, 0),
                                                              (True, False, 5)])
def test_cached_keys_and_values_equal_the_recomputed_memory(scan_layers, same_length, clamp_len):
  """Inference's Cache (keys, values and W_R R projected once; a ring of mem_len + T slots that
  wraps many times here) gives the logits of training's Memory, which projects everything again
  each step: 40 characters in segments of 4 and of 1, memory 11 (the parameters' config has 8)."""
  cfg = _cfg(mem_len=11, same_length=same_length, clamp_len=clamp_len, scan_layers=scan_layers)
  params = _params(_cfg())
  if not scan_layers:
    params = _unstack(params, cfg.num_layers)
  model, logits = registry.build(cfg), _logits_fn(cfg)
  tokens_BxT = _tokens((2, 40))
  for T in (4, 1):
    memory = xl.init_memory(cfg, 2)
    cache = jax.jit(lambda p, T=T: model.apply({"params": p}, 2, T, method="init_cache"))(params)
    assert cache.k_LxBxNxMxH.shape == (2, 2, 2, 11, 16) and cache.rk_LxNxCxH.shape[2] == 11 + T
    for start in range(0, 40, T):
      want_BxTxV, memory = logits(params, tokens_BxT[:, start:start + T], memory)
      got_BxTxV, cache = logits(params, tokens_BxT[:, start:start + T], cache)
      np.testing.assert_allclose(got_BxTxV, want_BxTxV, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.valid_B, memory.valid_B)
    assert int(cache.start) == 40 % 11
  with pytest.raises(ValueError, match="takes steps of 1 positions, got 4"):
    logits(params, tokens_BxT[:, :4], cache)


def test_invalid_memory_rows_are_not_seen():
  """A memory with valid_B = 0 (whatever it holds) gives the logits of no memory and of a model
  with mem_len 0; a row reset to 0 is independent of the others."""
  cfg = _cfg()
  params = _params(cfg)
  tokens_BxT = _tokens((2, 6))
  none_BxTxV, _ = _logits_fn(cfg)(params, tokens_BxT, None)
  empty_BxTxV, _ = _logits_fn(cfg)(params, tokens_BxT, _memory(cfg, 2, [0, 0]))
  no_mem_BxTxV, new = _logits_fn(_cfg(mem_len=0))(params, tokens_BxT, None)
  assert new.h_LxBxMxD.shape == (2, 2, 0, 32)
  np.testing.assert_allclose(empty_BxTxV, none_BxTxV, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(no_mem_BxTxV, none_BxTxV, rtol=1e-6, atol=1e-6)
  memory = _memory(cfg, 2, [8, 8])
  memory = memory.replace(valid_B=jnp.where(jnp.asarray([True, False]), 0, memory.valid_B))
  reset_BxTxV, _ = _logits_fn(cfg)(params, tokens_BxT, memory)
  np.testing.assert_allclose(reset_BxTxV[0], none_BxTxV[0], rtol=1e-6, atol=1e-6)
  assert np.abs(reset_BxTxV[1] - none_BxTxV[1]).max() > 1e-2


@pytest.mark.parametrize("key,value,message", [
    ("family", "rnn", "config.model.family must be one of fixed, xl"),
    ("mem_len", -1, "config.model.mem_len must be >= 0"),
    ("clamp_len", -2, "config.model.clamp_len must be >= 0"),
    ("attention", "splash", "config.model.attention=splash does not support config.model.family=xl"),
    ("d_model", 33, "config.model.d_model must be even"),
    ("same_length", True, "config.model.same_length needs config.model.mem_len >= 1"),
])
def test_bad_xl_configs_fail_with_the_key(tiny_config, key, value, message):
  tiny_config.model.family = "xl"
  if key == "d_model":
    tiny_config.model.num_heads = 1
  tiny_config.model[key] = value
  with pytest.raises(UserError, match=message):
    registry.model_config(tiny_config, 64)


def test_xl_keys_on_the_fixed_family_fail(tiny_config):
  tiny_config.model.mem_len = 16
  with pytest.raises(UserError, match="config.model.mem_len=16 is for config.model.family=xl only"):
    registry.model_config(tiny_config, 64)


def test_build_picks_the_family_and_xl_has_no_absolute_positions(tiny_config):
  fixed_cfg = registry.model_config(tiny_config, 64)
  assert type(registry.build(fixed_cfg)) is fixed.Transformer
  tiny_config.model.update(family="xl", mem_len=16, clamp_len=8)
  cfg = registry.model_config(tiny_config, 64)
  assert (cfg.family, cfg.mem_len, cfg.clamp_len, cfg.same_length) == ("xl", 16, 8, False)
  module = registry.build(cfg, deterministic=False, all_layers=True)
  assert type(module) is xl.XLTransformer and module.all_layers and not module.deterministic
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract["params"]), sep="/")
  assert not any("pos_embedding" in name for name in flat)
  assert flat["layers/block/position_key"].shape == (2, 32, 2, 16)  # W_R per layer.
  assert flat["content_bias"].shape == flat["position_bias"].shape == (2, 16)  # u, v shared.
  # Every parameter has logical axis names.
  boxed = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, flax.linen.Partitioned))
  assert all(isinstance(p, flax.linen.Partitioned) and len(p.names) == p.value.ndim for p in boxed)


def test_bfloat16_runs_and_is_finite():
  cfg = _cfg(dtype="bfloat16", remat="full")
  params = _params(cfg)
  logits_BxTxV, memory = _logits_fn(cfg)(params, _tokens((2, 8)), xl.init_memory(cfg, 2))
  logits_BxTxV, memory = _logits_fn(cfg)(params, _tokens((2, 8), seed=3), memory)
  assert memory.h_LxBxMxD.dtype == jnp.bfloat16
  assert logits_BxTxV.dtype == jnp.float32 and np.all(np.isfinite(logits_BxTxV))


def test_the_auxiliary_losses_run_on_xl():
  """losses.layer_nlls on every layer's output (all_layers: LxBxTxD) and heads(): every layer's
  every target, finite, with gradients for every layer's parameters."""
  cfg = _cfg(num_targets=3, remat="dots", dropout=0.1)
  params = _params(cfg)
  model = registry.build(cfg, deterministic=False, all_layers=True)
  windows_BxS = _tokens((2, 8 + 3))
  targets_KxBxT = losses.targets(windows_BxS, 8, 3)

  def loss(params):
    h_LxBxTxD, memory = model.apply({"params": params}, windows_BxS[:, :8], xl.init_memory(cfg, 2),
                                    rngs={"dropout": jax.random.key(0)})
    heads = model.apply({"params": params}, method="heads")
    loss_LxK, nll_LxK = losses.layer_nlls(cfg, heads, h_LxBxTxD, targets_KxBxT)
    return loss_LxK.sum(), (nll_LxK, h_LxBxTxD.shape, memory.valid_B)

  (total, (nll_LxK, shape, valid_B)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert shape == (2, 2, 8, 32) and nll_LxK.shape == (2, 3)
  assert np.isfinite(total) and np.all(np.asarray(nll_LxK) > 0)
  np.testing.assert_array_equal(valid_B, [8, 8])
  assert np.abs(np.asarray(grads["layers"]["block"]["position_key"])).sum(axis=(1, 2, 3)).min() > 0
  assert np.abs(np.asarray(grads["position_bias"])).sum() > 0


def test_flops_per_char_counts_xl_from_the_models_shapes():
  """The fixed count for the segment's rows, plus keys and values of the memory rows, W_R over
  M + T distances once per batch, and 18 d per key a query sees (M + T / 2; M + 1 same_length)."""
  cfg = _cfg(mem_len=24, num_targets=1)
  T, B, d, n = 16, 4, cfg.d_model, cfg.num_layers
  abstract = jax.eval_shape(lambda: _params(cfg))
  flat = flax.traverse_util.flatten_dict(abstract, sep="/")
  per_layer = {k.split("/")[-2] if k.endswith("kernel") else k.split("/")[-1]: v.size // n
               for k, v in flat.items() if k.startswith("layers/")}
  current = sum(per_layer[k] for k in ("query", "key", "value", "attention_out", "mlp_in", "mlp_out"))
  memory_kv = (per_layer["key"] + per_layer["value"]) * cfg.mem_len / T
  position = 4 * per_layer["position_key"] * (cfg.mem_len + T) / (T * B)
  heads = 6 * flat["head_kernel"].size // n  # The last layer's.
  expected = n * (6 * current + 6 * memory_kv + position + 18 * d * (cfg.mem_len + T / 2)) + heads
  assert xl.FAMILY.flops_per_char(cfg, T, intermediate_layers=False, batch_size=B) == pytest.approx(expected)
  same = dataclasses.replace(cfg, same_length=True)
  assert xl.FAMILY.flops_per_char(same, T, False, B) - xl.FAMILY.flops_per_char(cfg, T, False, B) == pytest.approx(
      18 * d * n * (1 - T / 2))


_SHARDED_ROWS = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from chartx import sharding
from chartx.families import xl
B, T, N, H, M = 4, 6, 2, 8, 9
rng = np.random.default_rng(0)
f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
L, layer = 3, np.int32(1)
q, ring, new, rest = f(B, T, N, H), (f(L, B, N, M, H), f(L, B, N, M, H)), (f(B, N, T, H), f(B, N, T, H)), (f(N, M + T, H), f(N, H), f(N, H))
mask, start = xl.attention_mask(T, M, np.array([M, 3, 0, M], np.int32), None), np.int32(5)
attend = jax.jit(xl.cached_attention)
whole = attend(q, ring, layer, new, *rest, mask, start)
mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
put = lambda a: jax.device_put(a, rows)
put_ring = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES)))
args = (put(q), tuple(map(put_ring, ring)), layer, tuple(map(put, new)), *rest, put(mask), start)
with jax.set_mesh(mesh):
  split = attend(*args)
  hlo = attend.lower(*args).compile().as_text()
np.testing.assert_allclose(split, whole, rtol=1e-6, atol=1e-6)
print(split.sharding.spec == rows.spec, "all-gather" in hlo)
"""


def test_cached_attention_loops_over_each_devices_own_rows():
  """On two CPU devices with the rows split between them, the segment's attention one (row,
  head) at a time gives the one-device result, sharded as its input, and no device gathers the
  other's rows (the keys and values of every row)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_ROWS], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["True", "False"], proc.stdout
