"""x @ w for a weight w, with a backward pass laid out for XLA:CPU's fast matmul path.

The weight gradient dW = X^T dY contracts over the rows of X and dY. Left to itself, XLA:CPU
lays it out as a dot of two transposed operands, which it does not hand to its fast (YNNPACK)
matmul: at the CPU benchmark's dims such dots ran at half the speed of the others and took a
fifth of the train step. Here dW is X^T @ dY with X^T materialized behind an optimization
barrier (so XLA cannot fold the transpose back), a plain row-major matmul. Other backends get
the plain product: their matmul units take either layout.
"""

import functools

import jax
import jax.numpy as jnp

from chartx import sharding


def matmul(x_RxI: jax.Array, w_IxO: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
  """x_...xI @ w_IxO -> ..._xO, computed in x's dtype (w is cast to it), returned in out_dtype
  (default: x's dtype; float32 keeps a bfloat16 product's float32 accumulation). R: x's
  leading axes, any number."""
  w_IxO = w_IxO.astype(x_RxI.dtype)
  out_dtype = x_RxI.dtype if out_dtype is None else out_dtype
  if sharding.platform() != "cpu":  # The target's (--mode=compile traces for a TPU on a CPU).
    return jnp.matmul(x_RxI, w_IxO, preferred_element_type=out_dtype)
  return _cpu_matmul(x_RxI, w_IxO, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_matmul(x_RxI: jax.Array, w_IxO: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
  return jnp.matmul(x_RxI, w_IxO, preferred_element_type=out_dtype)


def _forward(x_RxI, w_IxO, out_dtype):
  return _cpu_matmul(x_RxI, w_IxO, out_dtype), (x_RxI, w_IxO)


def _backward(out_dtype, residuals, dy_RxO):
  del out_dtype
  x_RxI, w_IxO = residuals
  dy_RxO = dy_RxO.astype(x_RxI.dtype)
  x_IxR = jax.lax.optimization_barrier(x_RxI.reshape(-1, x_RxI.shape[-1]).T)
  dw_IxO = jnp.matmul(x_IxR, dy_RxO.reshape(-1, dy_RxO.shape[-1]), preferred_element_type=jnp.float32)
  return dy_RxO @ w_IxO.T, dw_IxO.astype(w_IxO.dtype)


_cpu_matmul.defvjp(_forward, _backward)
