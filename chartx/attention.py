"""Causal self-attention kernels.

impl "xla" is a blockwise causal attention with its own backward pass, written for XLA:CPU,
where attention is bound by memory traffic and by how the matmuls are laid out rather than by
FLOPs. What it does, and why (measured at B16 T256 N8 H32 on 2 CPU cores):
  - queries in blocks (64 rows up to T=256, then 128): block i only meets keys [0, end of block
    i), so the upper-triangle blocks are never computed (10/16 of the dense work at T=256) and
    no T x T array exists;
  - a custom VJP keeps each block's softmax from the forward pass, so the backward pass needs no
    recomputation and no select over a full-size mask: dS = P * (dP - rowsum(dO * O));
  - every matmul is in the "NN" or "NT" form that the CPU GEMM runs at full speed. The two that
    contract over queries (dK = dS^T Q, dV = P^T dO) are computed transposed, as Q^T dS and
    dO^T P, from small materialized transposes; optimization barriers stop XLA from folding the
    transposes back into a "TN" matmul, which XLA:CPU ran 1.5 to 3x slower on these shapes.
Forward and backward took 18 ms there, against 43 ms for jax.nn.dot_product_attention's XLA
path and 28 ms for PyTorch's F.scaled_dot_product_attention; with glibc's default malloc
settings, though, every call pays page faults on its scratch memory (34 ms instead of 18).
impl "cudnn" is jax.nn.dot_product_attention's cuDNN flash attention (GPU, bf16/fp16), and
impl "splash" the Pallas splash-attention kernel that ships with JAX for TPUs (on another
backend it runs in Pallas's interpreter: slow, for tests only). resolve() picks per backend.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from chartx import sharding

IMPLS = ("xla", "cudnn", "splash")
_SPLASH_BLOCK = 128  # Splash's query and key blocks; T must be a multiple.


def resolve(impl: str, backend: str, dtype: str, seq_len: int) -> str:
  """impl, with "auto" made concrete: cuDNN flash attention on a GPU in a 16-bit dtype, splash on
  a TPU (when seq_len is a multiple of its blocks), else the blockwise xla kernel."""
  if impl != "auto":
    return impl
  if backend == "gpu" and dtype != "float32":
    return "cudnn"
  if backend == "tpu" and seq_len % _SPLASH_BLOCK == 0:
    return "splash"
  return "xla"


def causal_attention(q_BxTxNxH: jax.Array, k_BxTxNxH: jax.Array, v_BxTxNxH: jax.Array, *,
                     impl: str = "xla") -> jax.Array:
  """Softmax(q k^T / sqrt(H)) v with a causal mask; returns BxTxNxH in q's dtype.

  The softmax is computed in float32 whatever the input dtype. impl: one of IMPLS, or "auto"
  (resolve()).
  """
  B, T, N, H = q_BxTxNxH.shape
  impl = resolve(impl, sharding.platform(), jnp.dtype(q_BxTxNxH.dtype).name, T)
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {', '.join(IMPLS)}, auto; got {impl!r}")
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True,
                                        implementation="cudnn")
  # Heads next to batch: every matmul below is then batched over B x N with T x H matrices.
  q_BxNxTxH, k_BxNxTxH, v_BxNxTxH = (jnp.swapaxes(x, 1, 2)
                                     for x in (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH))
  q_BxNxTxH = q_BxNxTxH * jnp.asarray(1 / math.sqrt(H), q_BxTxNxH.dtype)
  if impl == "splash":
    return jnp.swapaxes(_splash_attention(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH), 1, 2)
  return jnp.swapaxes(_blockwise_attention(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH), 1, 2)


def _splash_attention(q_BxNxTxH: jax.Array, k_BxNxTxH: jax.Array, v_BxNxTxH: jax.Array) -> jax.Array:
  """Splash attention, run per device on its rows and heads under the mesh in context (a Pallas
  kernel is opaque to XLA's partitioner, which would otherwise gather whole arrays to it)."""
  interpret = sharding.platform() != "tpu"  # The target's: Mosaic compiles it for a TPU only.

  def local(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH):
    kernel = _splash_kernel(q_BxNxTxH.shape[1], q_BxNxTxH.shape[2], interpret=interpret)
    return jax.vmap(kernel)(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH)
  batch = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  heads = "tensor" if "tensor" in mesh.axis_names and q_BxNxTxH.shape[1] % mesh.shape["tensor"] == 0 else None
  spec = jax.sharding.PartitionSpec(batch, heads, None, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH)


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
  """Splash attention over one batch row (NxTxH), causal in every head."""
  if seq_len % _SPLASH_BLOCK:
    raise ValueError(f"splash attention needs a sequence length that is a multiple of "
                     f"{_SPLASH_BLOCK}, got {seq_len}")
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * num_heads)
  b = _SPLASH_BLOCK
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return splash.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=interpret)


def _blocks(seq_len: int) -> list[tuple[int, int]]:
  """[start, end) of each query block; the last one is shorter when the size does not divide T.

  64 rows were fastest at T=256 (32: +13%, 128: +24% time); 128 at T=512 (64: +1 to 5%).
  """
  size = 64 if seq_len <= 256 else 128
  return [(start, min(start + size, seq_len)) for start in range(0, seq_len, size)]


def _transposed(x: jax.Array) -> jax.Array:
  """x (any BxNx..x..) with its last two axes swapped, materialized (see the module docstring)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _blockwise_attention(q_BxNxTxH: jax.Array, k_BxNxTxH: jax.Array, v_BxNxTxH: jax.Array) -> jax.Array:
  """Causal softmax(q k^T) v; q is already scaled."""
  return _forward(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH)[0]


def _forward(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH):
  """(output, residuals); the residuals hold each query block's softmax P_BxNxQxE (E: its end)."""
  outputs, probs = [], []
  for start, end in _blocks(q_BxNxTxH.shape[2]):
    s_BxNxQxE = _dot("bnqh,bneh->bnqe", q_BxNxTxH[:, :, start:end], k_BxNxTxH[:, :, :end])
    # Query start + i sees keys 0..start + i; only the block's last E - start columns can be masked.
    causal_QxE = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    s_BxNxQxE = jnp.where(causal_QxE, s_BxNxQxE, -jnp.inf)
    e_BxNxQxE = jnp.exp(s_BxNxQxE - s_BxNxQxE.max(-1, keepdims=True))
    p_BxNxQxE = e_BxNxQxE * (1 / e_BxNxQxE.sum(-1, keepdims=True))
    outputs.append(_dot("bnqe,bneh->bnqh", p_BxNxQxE.astype(v_BxNxTxH.dtype), v_BxNxTxH[:, :, :end]))
    probs.append(p_BxNxQxE)
  o_BxNxTxH = jnp.concatenate(outputs, axis=2).astype(q_BxNxTxH.dtype)
  return o_BxNxTxH, (q_BxNxTxH, k_BxNxTxH, v_BxNxTxH, o_BxNxTxH, probs)


def _backward(residuals, do_BxNxTxH):
  q_BxNxTxH, k_BxNxTxH, v_BxNxTxH, o_BxNxTxH, probs = residuals
  dtype = q_BxNxTxH.dtype
  # rowsum(dO * O) = rowsum(dP * P), the softmax backward's correction term.
  delta_BxNxTx1 = jnp.sum(do_BxNxTxH.astype(jnp.float32) * o_BxNxTxH.astype(jnp.float32), -1,
                          keepdims=True)
  q_BxNxHxT, do_BxNxHxT = _transposed(q_BxNxTxH), _transposed(do_BxNxTxH)
  B, N, T, H = k_BxNxTxH.shape
  dk_BxNxHxT = jnp.zeros((B, N, H, T), jnp.float32)
  dv_BxNxHxT = jnp.zeros((B, N, H, T), jnp.float32)
  dqs = []
  for (start, end), p_BxNxQxE in zip(_blocks(T), probs):
    dp_BxNxQxE = _dot("bnqh,bneh->bnqe", do_BxNxTxH[:, :, start:end], v_BxNxTxH[:, :, :end])
    ds_BxNxQxE = (p_BxNxQxE * (dp_BxNxQxE - delta_BxNxTx1[:, :, start:end])).astype(dtype)
    dqs.append(_dot("bnqe,bneh->bnqh", ds_BxNxQxE, k_BxNxTxH[:, :, :end]))
    # dK^T += Q^T dS and dV^T += dO^T P over this block's keys [0, end).
    dk_BxNxHxT = dk_BxNxHxT.at[..., :end].add(_dot("bnhq,bnqe->bnhe", q_BxNxHxT[..., start:end], ds_BxNxQxE))
    dv_BxNxHxT = dv_BxNxHxT.at[..., :end].add(
        _dot("bnhq,bnqe->bnhe", do_BxNxHxT[..., start:end], p_BxNxQxE.astype(dtype)))
  dq_BxNxTxH = jnp.concatenate(dqs, axis=2).astype(dtype)
  # The barrier keeps the accumulators in HxT layout (else XLA turns the matmuls back to TN).
  dk_BxNxTxH, dv_BxNxTxH = (_transposed(jax.lax.optimization_barrier(x)) for x in (dk_BxNxHxT, dv_BxNxHxT))
  return dq_BxNxTxH, dk_BxNxTxH.astype(k_BxNxTxH.dtype), dv_BxNxTxH.astype(v_BxNxTxH.dtype)


_blockwise_attention.defvjp(_forward, _backward)
