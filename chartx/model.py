"""The deep causal character transformer of Al-Rfou et al. (2019), in Flax Linen.

A pre-LayerNorm residual stack. Each layer adds its own learned positional table to its
input (the paper: a timing signal added at the bottom would fade over 64 layers; model.positions
also offers one learned table or a fixed sinusoid at the input), and each layer has its own
classifiers predicting 1..K characters ahead (Heads), so every layer can carry an auxiliary loss.
Every parameter carries logical axis names; chartx.sharding maps them to mesh axes.

Arrays throughout chartx carry their shape in their names (x_BxTxD), one letter per meaning:
  B batch rows             T input positions (time)   S a window's characters, T + K (K = 1: eval)
  D model width            N attention heads          H head width (D / N)
  F feed-forward width     L layers                   K targets per position (1..K ahead)
  V vocabulary             C cache (key) positions    P positional-table rows (max_len)
  Q a query block's rows   E the keys a query block sees (attention's blockwise kernel)
  W evaluation windows     M a stream's characters (a split, a prompt, a sample)
  I, O a matmul's input and output width, R its rows (any leading axes: chartx.matmul)
  G beam search's beams (chartx.sample)
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chartx import attention
from chartx.errors import UserError
from chartx.matmul import matmul

_REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole layer in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ACTIVATIONS = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False)}
_INITS = ("lecun", "gpt2")
# Where positions enter: a learned table added to every layer's input (the paper), one learned
# table added to the embeddings, or Vaswani et al.'s fixed sinusoids added to the embeddings.
POSITIONS = ("per_layer", "input", "sinusoid")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the modules read; built once from the ConfigDict so modules never see it."""
  vocab_size: int
  num_layers: int = 12
  d_model: int = 512
  num_heads: int = 8
  d_ff: int = 2048
  max_len: int = 512
  dropout: float = 0.0
  num_targets: int = 1  # Classifiers per layer: 1..K characters ahead.
  positions: str = "per_layer"  # One of POSITIONS.
  tie_embeddings: bool = False
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"
  attention: str = "xla"
  activation: str = "relu"
  init: str = "lecun"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  def init_cache(self, batch_size: int, length: int) -> dict[str, jax.Array]:
    """An empty decoding cache for Transformer.decode: keys and values of `length` positions per layer."""
    shape = (self.num_layers, batch_size, length, self.num_heads, self.head_dim)
    return {"key": jnp.zeros(shape, self.compute_dtype), "value": jnp.zeros(shape, self.compute_dtype)}

  def flops_per_char(self, seq_len: int, intermediate_layers: bool = True) -> float:
    """Model FLOPs of one training character, forward and backward (MaxText's count, for MFU):
    6 x the matmul parameters but the embedding (per layer 4 d^2 + 2 d f); causal attention, 6 n
    seq_len d (2 x 2 seq_len d forward, halved by the mask, x 3); 6 d V per target of each head
    that runs (every layer's when intermediate_layers: they keep running after their loss stops).
    Not counted, by convention: recomputation (remat), layer norms, softmaxes, biases."""
    d, f, n = self.d_model, self.d_ff, self.num_layers
    matmuls = 6 * n * (4 * d * d + 2 * d * f)
    attention = 6 * n * seq_len * d
    heads = 6 * (n if intermediate_layers else 1) * self.num_targets * d * self.vocab_size
    return float(matmuls + attention + heads)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int) -> "ModelConfig":
    """The model section's owner: checks every model.* key (UserError naming it), then builds."""
    m = config.model
    for key in ("num_layers", "d_model", "num_heads", "d_ff", "max_len"):
      if int(m[key]) < 1:
        raise UserError(f"config.model.{key} must be >= 1, got {m[key]}")
    if m.d_model % m.num_heads:
      raise UserError(f"config.model.d_model={m.d_model} is not divisible by "
                      f"config.model.num_heads={m.num_heads}")
    if not 0.0 <= m.dropout < 1.0:
      raise UserError(f"config.model.dropout must be in [0, 1), got {m.dropout}")
    if m.remat not in ("none", *_REMAT_POLICIES):
      raise UserError(f"config.model.remat must be one of none, {', '.join(_REMAT_POLICIES)}; "
                      f"got {m.remat!r}")
    if m.dtype not in (*_DTYPES, "auto"):
      raise UserError(f"config.model.dtype must be one of {', '.join(_DTYPES)}, auto; got {m.dtype!r}")
    backend = jax.default_backend()
    # Accelerators compute in bfloat16 (parameters and softmaxes stay float32); the CPU in float32.
    dtype = ("float32" if backend == "cpu" else "bfloat16") if m.dtype == "auto" else m.dtype
    if m.attention not in (*attention.IMPLS, "auto"):
      raise UserError(f"config.model.attention must be one of {', '.join(attention.IMPLS)}, auto; "
                      f"got {m.attention!r}")
    if m.attention == "cudnn" and (dtype == "float32" or backend != "gpu"):
      # cuDNN's flash attention takes only 16-bit inputs, on a GPU; "auto" falls back to xla.
      raise UserError(f"config.model.attention=cudnn needs a GPU and config.model.dtype=bfloat16 "
                      f"(here: {backend}, {dtype}); use auto or xla")
    if m.attention == "splash" and backend != "tpu":
      raise UserError(f"config.model.attention=splash needs a TPU (here: {backend}); use auto or xla")
    if m.activation not in _ACTIVATIONS:
      raise UserError(f"config.model.activation must be one of {', '.join(_ACTIVATIONS)}; "
                      f"got {m.activation!r}")
    if m.init not in _INITS:
      raise UserError(f"config.model.init must be one of {', '.join(_INITS)}; got {m.init!r}")
    if m.positions not in POSITIONS:
      raise UserError(f"config.model.positions must be one of {', '.join(POSITIONS)}; got {m.positions!r}")
    return cls(vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
               num_heads=m.num_heads, d_ff=m.d_ff, max_len=m.max_len, dropout=m.dropout,
               num_targets=int(config.loss.multiple_targets),  # Checked by losses.LossConfig.
               positions=m.positions, tie_embeddings=m.tie_embeddings,
               scan_layers=m.scan_layers, remat=m.remat, dtype=dtype,
               attention=attention.resolve(m.attention, backend, dtype, config.data.seq_len),
               activation=m.activation, init=m.init)


def _init(initializer, *names: str):
  return nn.with_logical_partitioning(initializer, names)


_normal_002 = nn.initializers.normal(stddev=0.02)


# One layer's decoding cache: (key_BxCxNxH, value_BxCxNxH, index), where rows [0, index) hold
# the keys and values of the characters already seen, at positions 0..index-1.
LayerCache = tuple[jax.Array, jax.Array, jax.Array]


@flax.struct.dataclass
class Heads:
  """Every layer's classifiers, on a leading layer axis. Target k predicts the character k + 1
  ahead: a LayerNorm, then kernel[k] and bias[k]; tied, target 0 uses the (shared) embedding instead
  and kernel/bias hold targets 1..K-1 (None if K = 1)."""
  norm_scale: jax.Array  # LxD
  norm_bias: jax.Array  # LxD
  kernel: jax.Array | None  # LxKxDxV (Lx(K-1)xDxV when tied)
  bias: jax.Array | None  # LxKxV
  embedding: jax.Array | None  # VxD when tied, else None; not per layer.

  def layer(self, index: int | slice) -> "Heads":
    """Layer `index`'s classifiers (a slice keeps the layer axis), the shared embedding as it is."""
    per_layer = jax.tree.map(lambda p: p[index], self.replace(embedding=None))
    return per_layer.replace(embedding=self.embedding)

  def logits(self, cfg: "ModelConfig", h_BxTxD: jax.Array, target: int) -> jax.Array:
    """One layer's logits_BxTxV (float32) for `target` + 1 characters ahead; self is layer(l)."""
    mean = h_BxTxD.astype(jnp.float32).mean(-1, keepdims=True)
    var = jnp.square(h_BxTxD.astype(jnp.float32) - mean).mean(-1, keepdims=True)
    z_BxTxD = (h_BxTxD - mean) * jax.lax.rsqrt(var + 1e-6) * self.norm_scale + self.norm_bias
    z_BxTxD = z_BxTxD.astype(cfg.compute_dtype)
    if cfg.tie_embeddings and target == 0:
      return matmul(z_BxTxD, self.embedding.T, jnp.float32)
    slot = target - 1 if cfg.tie_embeddings else target
    return matmul(z_BxTxD, self.kernel[slot], jnp.float32) + self.bias[slot]


def _initializer(cfg: ModelConfig, in_axis: Any = -2, out_axis: Any = -1,
                 residual: bool = False) -> nn.initializers.Initializer:
  """A projection's initializer. "lecun": variance 1/fan_in. "gpt2" (GPT-2's recipe): normal
  with stddev 0.02, divided by sqrt(2 x layers) for the projections that write to the residual
  stream (residual=True), so the stream's variance does not grow with depth."""
  if cfg.init == "lecun":
    return nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis)
  return nn.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5 if residual else 0.02)


class _Dense(nn.Module):
  """x_...xI @ kernel_IxO without a bias (chartx.matmul's product): a Dense's parameter layout."""
  features: int
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x_RxI: jax.Array) -> jax.Array:
    return matmul(x_RxI, self.param("kernel", self.kernel_init, (x_RxI.shape[-1], self.features)))


class Block(nn.Module):
  """One layer: [own positions] -> attention -> feed-forward, pre-LayerNorm residuals."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, cache: LayerCache | None = None):
    """x_BxTxD -> x_BxTxD; with a cache (decoding), -> (x_BxTxD, the updated (key, value) cache)."""
    cfg = self.cfg
    dtype = cfg.compute_dtype
    seq_len = x_BxTxD.shape[1]
    if cfg.positions == "per_layer":
      pos_PxD = self.param("pos_embedding", _init(_normal_002, "length", "embed"),
                           (cfg.max_len, cfg.d_model))
      x_BxTxD = x_BxTxD + _positions(pos_PxD, seq_len, None if cache is None else cache[2]).astype(dtype)

    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=dtype,
                             scale_init=_init(nn.initializers.ones, "embed"),
                             bias_init=_init(nn.initializers.zeros, "embed"))
    N, H, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    B, T = x_BxTxD.shape[:2]
    # Per-head projections as explicit DxNxH / NxHxD parameters keep the head axis visible to
    # the sharding rules (DenseGeneral would flatten it at init); the products flatten it.
    in_init = _init(_initializer(cfg, in_axis=0, out_axis=(1, 2)), "embed", "heads", "head_dim")
    # Named scopes label the ops in profiles (benchmarks/profile_step.py, TensorBoard's profiler).
    with jax.named_scope("layer_norm"):
      h_BxTxD = norm(name="attention_norm")(x_BxTxD)
    with jax.named_scope("projections"):
      q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = (
          matmul(h_BxTxD, self.param(name, in_init, (D, N, H)).reshape(D, N * H)).reshape(B, T, N, H)
          for name in ("query", "key", "value"))
    with jax.named_scope("attention"):
      if cache is None:
        a_BxTxNxH = attention.causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, impl=cfg.attention)
      else:
        a_BxTxNxH, cache = _cached_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, cache)
    out_init = _init(_initializer(cfg, in_axis=(0, 1), out_axis=2, residual=True),
                     "heads", "head_dim", "embed")
    with jax.named_scope("projections"):
      a_BxTxD = matmul(a_BxTxNxH.reshape(B, T, N * H),
                       self.param("attention_out", out_init, (N, H, D)).reshape(N * H, D))
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout)(a_BxTxD, deterministic=self.deterministic)

    with jax.named_scope("layer_norm"):
      h_BxTxD = norm(name="mlp_norm")(x_BxTxD)
    with jax.named_scope("feed_forward"):
      h_BxTxF = _Dense(cfg.d_ff, _init(_initializer(cfg), "embed", "mlp"), name="mlp_in")(h_BxTxD)
      h_BxTxF = nn.with_logical_constraint(_ACTIVATIONS[cfg.activation](h_BxTxF), ("batch", "length", "mlp"))
      h_BxTxD = _Dense(cfg.d_model, _init(_initializer(cfg, residual=True), "mlp", "embed"),
                       name="mlp_out")(h_BxTxF)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout)(h_BxTxD, deterministic=self.deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    return x_BxTxD if cache is None else (x_BxTxD, cache[:2])


def _positions(pos_PxD: jax.Array, seq_len: int, index: jax.Array | None) -> jax.Array:
  """Rows [0, T) of a positional table, or [index, index + T) when decoding with a cache."""
  if index is None:
    return pos_PxD[:seq_len]
  return jax.lax.dynamic_slice_in_dim(pos_PxD, index, seq_len, axis=0)


def sinusoid_table(length: int, d_model: int) -> np.ndarray:
  """Vaswani et al.'s timing signal, PxD: column 2i is sin(p / 10000^(2i/D)), 2i + 1 its cos."""
  position_Px1 = np.arange(length, dtype=np.float64)[:, None]
  angle_PxD = position_Px1 / 10000.0 ** (2 * (np.arange(d_model) // 2) / d_model)
  return np.where(np.arange(d_model) % 2 == 0, np.sin(angle_PxD), np.cos(angle_PxD)).astype(np.float32)


def _cached_attention(q_BxTxNxH: jax.Array, k_BxTxNxH: jax.Array, v_BxTxNxH: jax.Array,
                      cache: LayerCache) -> tuple[jax.Array, LayerCache]:
  """Writes the T new keys/values at rows [index, index + T) and attends causally over the cache."""
  k_BxCxNxH, v_BxCxNxH, index = cache
  k_BxCxNxH = jax.lax.dynamic_update_slice_in_dim(k_BxCxNxH, k_BxTxNxH.astype(k_BxCxNxH.dtype), index, 1)
  v_BxCxNxH = jax.lax.dynamic_update_slice_in_dim(v_BxCxNxH, v_BxTxNxH.astype(v_BxCxNxH.dtype), index, 1)
  # Query t sits at position index + t and sees cache rows 0..index + t; later rows are stale.
  query_T = index + jnp.arange(q_BxTxNxH.shape[1])
  mask_TxC = jnp.arange(k_BxCxNxH.shape[1])[None, :] <= query_T[:, None]
  a_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxCxNxH.astype(q_BxTxNxH.dtype),
                                           v_BxCxNxH.astype(q_BxTxNxH.dtype),
                                           mask=mask_TxC[None, None], implementation="xla")
  return a_BxTxNxH, (k_BxCxNxH, v_BxCxNxH, index)


class _ScanBody(nn.Module):
  """Adapts Block to nn.scan's (carry, x) -> (carry, y); y is the layer's output when kept."""
  cfg: ModelConfig
  deterministic: bool
  keep_all_layers: bool

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, cache: LayerCache | None) -> tuple[jax.Array, Any]:
    """cache is None in training; when decoding, y is the layer's updated (key, value)."""
    block = _block_cls(self.cfg)(self.cfg, self.deterministic, name="block")
    if cache is not None:
      return block(x_BxTxD, cache)
    x_BxTxD = block(x_BxTxD)
    return x_BxTxD, (x_BxTxD if self.keep_all_layers else None)


def _block_cls(cfg: ModelConfig) -> type[Block]:
  if cfg.remat == "none":
    return Block
  # Under scan, CSE across iterations cannot happen, so the optimization barrier is not needed.
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """tokens_BxT -> the residual stream after every layer (all_layers) or after the last.

  deterministic and all_layers are attributes, not call arguments, so that the layer stack can
  be built in setup(); train and inference use clones with the same parameters.
  """
  cfg: ModelConfig
  deterministic: bool = True
  all_layers: bool = False

  def setup(self):
    cfg = self.cfg
    embedding_init = nn.initializers.normal(1.0 if cfg.init == "lecun" else 0.02)
    self.embedding = self.param("embedding", _init(embedding_init, "vocab", "embed"),
                                (cfg.vocab_size, cfg.d_model))
    if cfg.positions == "input":
      self.pos_embedding = self.param("pos_embedding", _init(_normal_002, "length", "embed"),
                                      (cfg.max_len, cfg.d_model))
    self.dropout = nn.Dropout(cfg.dropout)
    if cfg.scan_layers:
      stack = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = stack(cfg, self.deterministic, self.all_layers)
    else:
      self.layers = [_block_cls(cfg)(cfg, self.deterministic) for _ in range(cfg.num_layers)]
    # Head parameters are plain stacked arrays (layer axis first) rather than submodules, so a
    # loss can map over layers, and inference can take the last layer's slice.
    num_own = cfg.num_targets - 1 if cfg.tie_embeddings else cfg.num_targets
    L, D, V = cfg.num_layers, cfg.d_model, cfg.vocab_size
    self.head_norm_scale = self.param("head_norm_scale", _init(nn.initializers.ones, "layers", "embed"),
                                      (L, D))
    self.head_norm_bias = self.param("head_norm_bias", _init(nn.initializers.zeros, "layers", "embed"),
                                     (L, D))
    if num_own:
      self.head_kernel = self.param(
          "head_kernel", _init(nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2,
                                                                out_axis=-1),
                               "layers", "targets", "embed", "vocab"), (L, num_own, D, V))
      self.head_bias = self.param("head_bias", _init(nn.initializers.zeros, "layers", "targets", "vocab"),
                                  (L, num_own, V))

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    """Returns h_LxBxTxD if all_layers else h_BxTxD (before the per-layer head norm)."""
    cfg = self.cfg
    # Gather the table's fsdp-sharded embed axis before the lookup (as FSDP does for any weight):
    # the lookup and its gradient then stay batch-sharded, where XLA would otherwise move the
    # activations through a full replication to match the table.
    table_VxD = nn.with_logical_constraint(self.embedding, ("vocab", None))
    x_BxTxD = self._add_input_positions(table_VxD[tokens_BxT].astype(cfg.compute_dtype), None)
    x_BxTxD = self.dropout(x_BxTxD, deterministic=self.deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    if cfg.scan_layers:
      x_BxTxD, h_LxBxTxD = self.layers(x_BxTxD, None)
    else:
      outputs = []
      for block in self.layers:
        x_BxTxD = block(x_BxTxD)
        outputs.append(x_BxTxD)
      h_LxBxTxD = jnp.stack(outputs) if self.all_layers else None
    return h_LxBxTxD if self.all_layers else x_BxTxD

  def _add_input_positions(self, x_BxTxD: jax.Array, index: jax.Array | None) -> jax.Array:
    """x plus the input's positions ("input": the learned table; "sinusoid": the fixed one) for
    positions [0, T), or [index, index + T) when decoding; "per_layer" adds them in each Block."""
    cfg = self.cfg
    if cfg.positions == "per_layer":
      return x_BxTxD
    pos_PxD = (self.pos_embedding if cfg.positions == "input"
               else jnp.asarray(sinusoid_table(cfg.max_len, cfg.d_model)))
    return x_BxTxD + _positions(pos_PxD, x_BxTxD.shape[1], index).astype(cfg.compute_dtype)

  def heads(self) -> Heads:
    """Every layer's classifiers (for a loss); inference uses heads().layer(-1)."""
    own = self.cfg.num_targets > 1 or not self.cfg.tie_embeddings
    return Heads(norm_scale=self.head_norm_scale, norm_bias=self.head_norm_bias,
                 kernel=self.head_kernel if own else None, bias=self.head_bias if own else None,
                 embedding=self.embedding if self.cfg.tie_embeddings else None)

  def logits(self, tokens_BxT: jax.Array) -> jax.Array:
    """Inference: the last layer's next-character logits, float32 BxTxV."""
    h = self(tokens_BxT)
    h_BxTxD = h[-1] if self.all_layers else h
    return self.heads().layer(-1).logits(self.cfg, h_BxTxD, target=0)

  def decode(self, tokens_BxT: jax.Array, cache: dict[str, jax.Array],
             index: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cached inference: tokens_BxT sit at positions [index, index + T); rows [0, index) of the
    cache (ModelConfig.init_cache) hold the earlier characters. Returns (logits_BxTxV, cache).

    T = 1 is one decoding step; a larger T fills (prefills) the cache. The logits equal those of
    logits() on the whole prefix. Call it on a deterministic module (no dropout when decoding).
    """
    cfg = self.cfg
    index = jnp.asarray(index, jnp.int32)
    x_BxTxD = self._add_input_positions(self.embedding[tokens_BxT].astype(cfg.compute_dtype), index)
    if cfg.scan_layers:
      index_L = jnp.full((cfg.num_layers,), index)
      x_BxTxD, (k_LxBxCxNxH, v_LxBxCxNxH) = self.layers(x_BxTxD, (cache["key"], cache["value"], index_L))
    else:
      keys, values = [], []
      for layer, block in enumerate(self.layers):
        x_BxTxD, (k_BxCxNxH, v_BxCxNxH) = block(x_BxTxD, (cache["key"][layer], cache["value"][layer], index))
        keys.append(k_BxCxNxH)
        values.append(v_BxCxNxH)
      k_LxBxCxNxH, v_LxBxCxNxH = jnp.stack(keys), jnp.stack(values)
    logits_BxTxV = self.heads().layer(-1).logits(cfg, x_BxTxD, target=0)
    return logits_BxTxV, {"key": k_LxBxCxNxH, "value": v_LxBxCxNxH}


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
