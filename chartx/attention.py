"""Causal self-attention kernels."""

import jax
import jax.numpy as jnp


def causal_attention(q_BxTxNxH: jax.Array, k_BxTxNxH: jax.Array, v_BxTxNxH: jax.Array, *,
                     impl: str = "xla") -> jax.Array:
  """Softmax(q k^T / sqrt(H)) v with a causal mask; returns BxTxNxH."""
  if impl == "auto":
    impl = "cudnn" if jax.default_backend() == "gpu" and q_BxTxNxH.dtype != jnp.float32 else "xla"
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True,
                                      implementation=impl)
