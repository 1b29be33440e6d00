"""What the model families share (chartx.families.fixed, chartx.families.xl): ModelConfig, the
per-layer classifiers (Heads), and the layers' building blocks.

Both families are pre-LayerNorm residual stacks of causal self-attention layers, and each layer
has its own classifiers predicting 1..K characters ahead (Heads), so every layer can carry an
auxiliary loss. Every parameter carries logical axis names; chartx.sharding maps them to mesh axes.

Arrays throughout chartx carry their shape in their names (x_BxTxD), one letter per meaning:
  B batch rows             T input positions (time)   S a window's characters, T + K (K = 1: eval)
  D model width            N attention heads          H head width (D / N)
  F feed-forward width     L layers                   K targets per position (1..K ahead)
  V vocabulary             C cache (key) positions    P positional-table rows (max_len)
  Q a query block's rows   E the keys a query block sees (attention's blockwise kernel)
  W evaluation windows     M a stream's characters (a split, a prompt, a sample)
  I, O a matmul's input and output width, R its rows (any leading axes: chartx.matmul)
  G beam search's beams (chartx.sample)    J half a head's width (rotary pairs)
In chartx.families.xl, M is also a memory's rows and C the keys a segment's queries see, M + T.
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
# table added to the embeddings, Vaswani et al.'s fixed sinusoids added to the embeddings, or
# rotary embeddings (Su et al. 2021: every layer's queries and keys rotated by their position).
POSITIONS = ("per_layer", "input", "sinusoid", "rope")


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
  family: str = "fixed"  # config.model.family: the chartx.families.registry name of the family.
  # XL only. Evaluation and sampling may replace these three on a restored model (the parameters
  # do not depend on them): dataclasses.replace(cfg, mem_len=..., clamp_len=..., same_length=...).
  mem_len: int = 0  # Memory rows kept per layer (M).
  clamp_len: int = 0  # Relative distances above it use its encoding; 0: no clamp.
  same_length: bool = False  # Every query sees mem_len + 1 keys: itself and the mem_len before it.

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
    Not counted, by convention: recomputation (remat), layer norms, softmaxes, biases.
    (chartx.families.xl counts its memory and relative positions on top.)
    """
    d, f, n = self.d_model, self.d_ff, self.num_layers
    matmuls = 6 * n * (4 * d * d + 2 * d * f)
    attention = 6 * n * seq_len * d
    return float(matmuls + attention + self.heads_flops_per_char(intermediate_layers))

  def heads_flops_per_char(self, intermediate_layers: bool) -> float:
    """The classifiers' part of flops_per_char: 6 d V per target of each head that runs."""
    return float(6 * (self.num_layers if intermediate_layers else 1) * self.num_targets * self.d_model
                 * self.vocab_size)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int,
                  platform: str | None = None) -> "ModelConfig":
    """Checks the model.* keys every family shares (UserError naming one), then builds; the family's
    own keys and attention: chartx.families.registry.model_config, which calls this.
    platform: the one the model will run on ("cpu", "gpu", "tpu"), which resolves the "auto"
    keys and the kernels' checks; default JAX's backend here (--mode=compile names a TPU's)."""
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
    backend = platform or jax.default_backend()
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
    if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
      raise UserError(f"config.model.positions=rope needs an even head width (d_model / num_heads), "
                      f"got {m.d_model // m.num_heads}")
    impl = attention.resolve(m.attention, backend, dtype, config.data.seq_len)
    return cls(vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
               num_heads=m.num_heads, d_ff=m.d_ff, max_len=m.max_len, dropout=m.dropout,
               num_targets=int(config.loss.multiple_targets),  # Checked by losses.LossConfig.
               positions=m.positions, tie_embeddings=m.tie_embeddings,
               scan_layers=m.scan_layers, remat=m.remat, dtype=dtype,
               attention=impl, activation=m.activation, init=m.init, family=m.family,
               mem_len=m.mem_len, clamp_len=m.clamp_len, same_length=m.same_length)


def with_axes(initializer, *names: str):
  return nn.with_logical_partitioning(initializer, names)


normal_002 = nn.initializers.normal(stddev=0.02)


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


def embedding_param(module: nn.Module, cfg: ModelConfig) -> jax.Array:
  """The input embedding VxD, a parameter of `module` (call it from the family's setup())."""
  embedding_init = nn.initializers.normal(1.0 if cfg.init == "lecun" else 0.02)
  return module.param("embedding", with_axes(embedding_init, "vocab", "embed"), (cfg.vocab_size, cfg.d_model))


def embed(cfg: ModelConfig, embedding_VxD: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  """x_BxTxD: the tokens' rows of the embedding, in the compute dtype."""
  # Gather the table's fsdp-sharded embed axis before the lookup (as FSDP does for any weight):
  # the lookup and its gradient then stay batch-sharded, where XLA would otherwise move the
  # activations through a full replication to match the table.
  table_VxD = nn.with_logical_constraint(embedding_VxD, ("vocab", None))
  return table_VxD[tokens_BxT].astype(cfg.compute_dtype)


def head_params(module: nn.Module, cfg: ModelConfig, embedding_VxD: jax.Array) -> Heads:
  """Every layer's classifiers as parameters of `module` (call it from the family's setup()):
  head_norm_scale, head_norm_bias, head_kernel and head_bias, the same names, shapes and
  initializers in every family, so losses.layer_nlls and the auxiliary losses work unchanged.

  They are plain stacked arrays (layer axis first) rather than submodules, so a loss can map over
  layers, and inference can take the last layer's slice. embedding_VxD: the module's input
  embedding, the next-character classifier when tied.
  """
  num_own = cfg.num_targets - 1 if cfg.tie_embeddings else cfg.num_targets
  L, D, V = cfg.num_layers, cfg.d_model, cfg.vocab_size
  norm_scale = module.param("head_norm_scale", with_axes(nn.initializers.ones, "layers", "embed"), (L, D))
  norm_bias = module.param("head_norm_bias", with_axes(nn.initializers.zeros, "layers", "embed"), (L, D))
  kernel = bias = None
  if num_own:
    kernel = module.param(
        "head_kernel", with_axes(nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2,
                                                              out_axis=-1),
                             "layers", "targets", "embed", "vocab"), (L, num_own, D, V))
    bias = module.param("head_bias", with_axes(nn.initializers.zeros, "layers", "targets", "vocab"),
                        (L, num_own, V))
  return Heads(norm_scale=norm_scale, norm_bias=norm_bias, kernel=kernel, bias=bias,
               embedding=embedding_VxD if cfg.tie_embeddings else None)


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


# The layers' building blocks, shared by the families (chartx.families.fixed's Block and
# chartx.families.xl's XLBlock), so that their parameters, initializers, profile scopes and sharding
# annotations stay the same.

def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  """A LayerNorm over D, computed in the compute dtype; a submodule of the calling layer."""
  return nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype, name=name,
                      scale_init=with_axes(nn.initializers.ones, "embed"),
                      bias_init=with_axes(nn.initializers.zeros, "embed"))


def head_in_init(cfg: ModelConfig) -> nn.initializers.Initializer:
  """The initializer of a DxNxH projection (query, key, value; XL's W_R). Per-head projections as
  explicit DxNxH / NxHxD parameters keep the head axis visible to the sharding rules
  (DenseGeneral would flatten it at init); the products flatten it."""
  return with_axes(_initializer(cfg, in_axis=0, out_axis=(1, 2)), "embed", "heads", "head_dim")


def attention_out_residual(layer: nn.Module, x_BxTxD: jax.Array, a_BxTxNxH: jax.Array) -> jax.Array:
  """x + dropout(a @ attention_out): the attention's output projection (a parameter of `layer`,
  which must have cfg and deterministic) back into the residual stream."""
  cfg = layer.cfg
  N, H, D = cfg.num_heads, cfg.head_dim, cfg.d_model
  B, T = x_BxTxD.shape[:2]
  out_init = with_axes(_initializer(cfg, in_axis=(0, 1), out_axis=2, residual=True),
                   "heads", "head_dim", "embed")
  with jax.named_scope("projections"):
    a_BxTxD = matmul(a_BxTxNxH.reshape(B, T, N * H),
                     layer.param("attention_out", out_init, (N, H, D)).reshape(N * H, D))
  return x_BxTxD + nn.Dropout(cfg.dropout)(a_BxTxD, deterministic=layer.deterministic)


def feed_forward_residual(cfg: ModelConfig, deterministic: bool, x_BxTxD: jax.Array) -> jax.Array:
  """x + dropout(feed_forward(layer_norm(x))), its submodules (mlp_norm, mlp_in, mlp_out) created
  in the calling layer."""
  with jax.named_scope("layer_norm"):
    h_BxTxD = layer_norm(cfg, "mlp_norm")(x_BxTxD)
  with jax.named_scope("feed_forward"):
    h_BxTxF = _Dense(cfg.d_ff, with_axes(_initializer(cfg), "embed", "mlp"), name="mlp_in")(h_BxTxD)
    h_BxTxF = nn.with_logical_constraint(_ACTIVATIONS[cfg.activation](h_BxTxF), ("batch", "length", "mlp"))
    h_BxTxD = _Dense(cfg.d_model, with_axes(_initializer(cfg, residual=True), "mlp", "embed"),
                     name="mlp_out")(h_BxTxF)
  x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout)(h_BxTxD, deterministic=deterministic)
  return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


def table_rows(pos_PxD: jax.Array, seq_len: int, index: jax.Array | None) -> jax.Array:
  """Rows [0, T) of a positional table, or [index, index + T) when decoding with a cache."""
  if index is None:
    return pos_PxD[:seq_len]
  return jax.lax.dynamic_slice_in_dim(pos_PxD, index, seq_len, axis=0)


def sinusoid_table(length: int, d_model: int) -> np.ndarray:
  """Vaswani et al.'s timing signal, PxD: column 2i is sin(p / 10000^(2i/D)), 2i + 1 its cos."""
  position_Px1 = np.arange(length, dtype=np.float64)[:, None]
  angle_PxD = position_Px1 / 10000.0 ** (2 * (np.arange(d_model) // 2) / d_model)
  return np.where(np.arange(d_model) % 2 == 0, np.sin(angle_PxD), np.cos(angle_PxD)).astype(np.float32)


def rotate(x_BxTxNxH: jax.Array, start: jax.Array | int) -> jax.Array:
  """Rotary position embedding (Su et al. 2021) of queries or keys at positions [start, start + T):
  the pairs (x[i], x[i + H/2]) of a head rotated by the angle position / 10000^(2i/H), so that a
  query's dot product with a key depends on their distance only. In float32, back to x's dtype."""
  T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
  inv_freq_J = 1.0 / 10000.0 ** (np.arange(H // 2) * 2 / H)
  angle_TxJ = (start + jnp.arange(T, dtype=jnp.float32))[:, None] * inv_freq_J.astype(np.float32)
  cos_1xTx1xJ, sin_1xTx1xJ = (f(angle_TxJ)[None, :, None, :] for f in (jnp.cos, jnp.sin))
  x1_BxTxNxJ, x2_BxTxNxJ = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1_BxTxNxJ * cos_1xTx1xJ - x2_BxTxNxJ * sin_1xTx1xJ,
                          x1_BxTxNxJ * sin_1xTx1xJ + x2_BxTxNxJ * cos_1xTx1xJ], axis=-1).astype(x_BxTxNxH.dtype)

def layer_cls(cfg: ModelConfig, block: type[nn.Module]) -> type[nn.Module]:
  """The layer class `block` (a family's layer), rematerialized as cfg.remat says."""
  if cfg.remat == "none":
    return block
  # Under scan, CSE across iterations cannot happen, so the optimization barrier is not needed.
  return nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)



def scanned(body: type[nn.Module], cfg: ModelConfig, num_broadcast: int = 0) -> type[nn.Module]:
  """A family's layer body under nn.scan over cfg.num_layers layers (MaxText's idiom: one compiled
  layer): parameters stacked on a leading "layers" axis, the params and dropout keys split per
  layer; after the carry, the first input is scanned over layers, the next num_broadcast are the
  same for every layer."""
  return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(0,) + (nn.broadcast,) * num_broadcast, length=cfg.num_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def last_layer_logits(module: nn.Module, h: jax.Array) -> jax.Array:
  """The last layer's next-character logits_BxTxV (float32) of a family's module, from what its
  __call__ returned (h_LxBxTxD when all_layers, else h_BxTxD)."""
  h_BxTxD = h[-1] if module.all_layers else h
  return module.heads().layer(-1).logits(module.cfg, h_BxTxD, target=0)


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))

