"""chartx.matmul: the same values and gradients as a plain product, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np

from chartx.matmul import matmul


def _grads(fn, x, w, g):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * g), argnums=(0, 1)))(x, w)


def test_values_and_gradients_equal_the_plain_product():
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x_BxTxI = jax.random.normal(kx, (3, 5, 16))
  w_IxO = jax.random.normal(kw, (16, 24))
  g_BxTxO = jax.random.normal(kg, (3, 5, 24))
  plain = lambda x, w: jnp.einsum("bti,io->bto", x, w, precision="highest")
  np.testing.assert_allclose(jax.jit(matmul)(x_BxTxI, w_IxO), plain(x_BxTxI, w_IxO), rtol=1e-5, atol=1e-5)
  for got, want, name in zip(_grads(matmul, x_BxTxI, w_IxO, g_BxTxO), _grads(plain, x_BxTxI, w_IxO, g_BxTxO), "xw"):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"d{name}")


def test_bfloat16_inputs_with_a_float32_product():
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x_BxI = jax.random.normal(kx, (8, 32)).astype(jnp.bfloat16)
  w_IxO = jax.random.normal(kw, (32, 16))  # Parameters stay float32.
  g_BxO = jax.random.normal(kg, (8, 16))
  out = matmul(x_BxI, w_IxO, jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, x_BxI.astype(jnp.float32) @ w_IxO.astype(jnp.bfloat16).astype(jnp.float32),
                             rtol=1e-5, atol=1e-4)
  dx, dw = _grads(lambda x, w: matmul(x, w, jnp.float32), x_BxI, w_IxO, g_BxO)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(dw, x_BxI.astype(jnp.float32).T @ g_BxO.astype(jnp.bfloat16).astype(jnp.float32),
                             rtol=2e-2, atol=5e-2)
