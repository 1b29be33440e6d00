"""chartx.attention against a plain masked softmax: values, gradients, causality, dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chartx import attention


def reference_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH):
  """Softmax of the masked, scaled scores, all of them, in float32."""
  q, k, v = (x.astype(jnp.float32) for x in (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH))
  T, H = q.shape[1], q.shape[3]
  s_BxNxTxT = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") / math.sqrt(H)
  s_BxNxTxT = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s_BxNxTxT, -jnp.inf)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s_BxNxTxT, axis=-1), v, precision="highest")


def _inputs(shape, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  # Scale 2 makes the scores spread, so the softmax is far from uniform.
  return [2 * jax.random.normal(key, shape).astype(dtype) for key in keys]


def _loss_grads(fn):
  """Gradients of sum(fn(q, k, v) * g) with respect to q, k and v."""
  return jax.jit(jax.grad(lambda q, k, v, g: jnp.sum(fn(q, k, v).astype(jnp.float32) * g),
                          argnums=(0, 1, 2)))


# T below, equal to and between multiples of the query block (64 rows up to T=256, then 128);
# the last block of T=129 is one row long.
@pytest.mark.parametrize("shape", [(2, 7, 2, 8), (2, 64, 2, 16), (1, 129, 3, 8), (2, 200, 2, 4),
                                   (1, 300, 1, 4)])
def test_values_and_gradients_match_reference(shape):
  q, k, v, g = _inputs(shape)
  np.testing.assert_allclose(jax.jit(attention.causal_attention)(q, k, v),
                             reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
  for got, want, name in zip(_loss_grads(attention.causal_attention)(q, k, v, g),
                             _loss_grads(reference_attention)(q, k, v, g), "qkv"):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_output_never_depends_on_later_positions():
  shape = (2, 150, 2, 8)
  q, k, v, g = _inputs(shape, seed=1)
  for t in (0, 63, 64, 100):
    grads = _loss_grads(lambda q, k, v: attention.causal_attention(q, k, v)[:, t])(q, k, v, g[:, t])
    for grad, name in zip(grads, "qkv"):
      assert not np.any(np.asarray(grad[:, t + 1:])), f"d out[{t}] / d {name}[>{t}] is not zero"
      assert np.any(np.asarray(grad[:, :t + 1])), f"d out[{t}] / d {name}[<={t}] is all zero"


def test_bfloat16_inputs():
  q, k, v, g = _inputs((2, 100, 2, 16), seed=2, dtype=jnp.bfloat16)
  out = jax.jit(attention.causal_attention)(q, k, v)
  assert out.dtype == jnp.bfloat16
  # The reference runs in float32 on the same bfloat16 values: only output and matmul-input
  # rounding to bfloat16 (8 bits of mantissa) separate them.
  np.testing.assert_allclose(out.astype(jnp.float32), reference_attention(q, k, v), atol=3e-2)
  grads = _loss_grads(attention.causal_attention)(q, k, v, g.astype(jnp.float32))
  for got, want, name in zip(grads, _loss_grads(reference_attention)(q, k, v, g.astype(jnp.float32)), "qkv"):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=5e-2, atol=0.25, err_msg=f"d{name}")


def test_auto_is_xla_on_cpu_and_unknown_impl_fails():
  if jax.default_backend() == "gpu":
    pytest.skip("auto picks cudnn on a GPU")
  q, k, v, _ = _inputs((1, 70, 2, 8), seed=3)
  np.testing.assert_array_equal(attention.causal_attention(q, k, v, impl="auto"),
                                attention.causal_attention(q, k, v, impl="xla"))
  with pytest.raises(ValueError, match="flash"):
    attention.causal_attention(q, k, v, impl="flash")


def test_splash_interpreted_matches_reference():
  # Off a TPU the Pallas kernel runs in its interpreter: the same numbers, slowly.
  q, k, v, g = _inputs((2, 128, 2, 8), seed=4)
  np.testing.assert_allclose(jax.jit(attention.causal_attention, static_argnames="impl")(q, k, v, impl="splash"),
                             reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
  splash = lambda q, k, v: attention.causal_attention(q, k, v, impl="splash")
  for got, want, name in zip(_loss_grads(splash)(q, k, v, g), _loss_grads(reference_attention)(q, k, v, g), "qkv"):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
  # Under a mesh it runs per device through shard_map.
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(jax.jit(splash)(q, k, v), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, dtype, seq_len, want", [
    ("cpu", "float32", 512, "xla"), ("gpu", "bfloat16", 512, "cudnn"), ("gpu", "float32", 512, "xla"),
    ("tpu", "bfloat16", 512, "splash"), ("tpu", "bfloat16", 200, "xla")])
def test_auto_resolves_per_backend(backend, dtype, seq_len, want):
  assert attention.resolve("auto", backend, dtype, seq_len) == want
  assert attention.resolve("xla", backend, dtype, seq_len) == "xla"
