"""The fixed-context family (config.model.family="fixed"): the deep causal character transformer
of Al-Rfou et al. (2019), in Flax Linen.

A pre-LayerNorm residual stack (chartx.families.layers' building blocks). Each layer adds its
own learned positional table to its input (the paper: a timing signal added at the bottom would
fade over 64 layers; model.positions also offers one learned table or a fixed sinusoid at the
input, or rotary embeddings), and each layer has its own classifiers predicting 1..K characters
ahead (layers.Heads). No state is carried between batches; decoding keeps a KV cache.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chartx import attention
from chartx.errors import UserError
from chartx.families import base
from chartx.families.layers import (Heads, LayerCache, ModelConfig, attention_out_residual, embed,
                                    embedding_param, feed_forward_residual, head_in_init, head_params,
                                    last_layer_logits, layer_cls, layer_norm, normal_002, rotate,
                                    scanned, sinusoid_table, table_rows, with_axes)
from chartx.matmul import matmul


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
      pos_PxD = self.param("pos_embedding", with_axes(normal_002, "length", "embed"),
                           (cfg.max_len, cfg.d_model))
      x_BxTxD = x_BxTxD + table_rows(pos_PxD, seq_len, None if cache is None else cache[2]).astype(dtype)

    N, H, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    B, T = x_BxTxD.shape[:2]
    in_init = head_in_init(cfg)
    # Named scopes label the ops in profiles (benchmarks/profile_step.py, TensorBoard's profiler).
    with jax.named_scope("layer_norm"):
      h_BxTxD = layer_norm(cfg, "attention_norm")(x_BxTxD)
    with jax.named_scope("projections"):
      q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = (
          matmul(h_BxTxD, self.param(name, in_init, (D, N, H)).reshape(D, N * H)).reshape(B, T, N, H)
          for name in ("query", "key", "value"))
    if cfg.positions == "rope":
      start = 0 if cache is None else cache[2]
      q_BxTxNxH, k_BxTxNxH = (rotate(x, start) for x in (q_BxTxNxH, k_BxTxNxH))
    with jax.named_scope("attention"):
      if cache is None:
        a_BxTxNxH = attention.causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, impl=cfg.attention)
      else:
        a_BxTxNxH, cache = _cached_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, cache)
    x_BxTxD = attention_out_residual(self, x_BxTxD, a_BxTxNxH)
    x_BxTxD = feed_forward_residual(cfg, self.deterministic, x_BxTxD)
    return x_BxTxD if cache is None else (x_BxTxD, cache[:2])


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
    block = layer_cls(self.cfg, Block)(self.cfg, self.deterministic, name="block")
    if cache is not None:
      return block(x_BxTxD, cache)
    x_BxTxD = block(x_BxTxD)
    return x_BxTxD, (x_BxTxD if self.keep_all_layers else None)


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
    self.embedding = embedding_param(self, cfg)
    if cfg.positions == "input":
      self.pos_embedding = self.param("pos_embedding", with_axes(normal_002, "length", "embed"),
                                      (cfg.max_len, cfg.d_model))
    self.dropout = nn.Dropout(cfg.dropout)
    if cfg.scan_layers:
      self.layers = scanned(_ScanBody, cfg)(cfg, self.deterministic, self.all_layers)
    else:
      self.layers = [layer_cls(cfg, Block)(cfg, self.deterministic) for _ in range(cfg.num_layers)]
    self.classifiers = head_params(self, cfg, self.embedding)

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    """Returns h_LxBxTxD if all_layers else h_BxTxD (before the per-layer head norm)."""
    cfg = self.cfg
    x_BxTxD = self._add_input_positions(embed(cfg, self.embedding, tokens_BxT), None)
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
    positions [0, T), or [index, index + T) when decoding; "per_layer" and "rope" act in each Block."""
    cfg = self.cfg
    if cfg.positions in ("per_layer", "rope"):
      return x_BxTxD
    pos_PxD = (self.pos_embedding if cfg.positions == "input"
               else jnp.asarray(sinusoid_table(cfg.max_len, cfg.d_model)))
    return x_BxTxD + table_rows(pos_PxD, x_BxTxD.shape[1], index).astype(cfg.compute_dtype)

  def heads(self) -> Heads:
    """Every layer's classifiers (for a loss); inference uses heads().layer(-1)."""
    return self.classifiers

  def logits(self, tokens_BxT: jax.Array) -> jax.Array:
    """Inference: the last layer's next-character logits, float32 BxTxV."""
    return last_layer_logits(self, self(tokens_BxT))

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



class FixedFamily(base.Family):
  """The fixed-context family: no state between batches, windows at random positions of the
  training stream (base.Family's defaults), sliding-window evaluation, a KV cache for decoding."""
  name = "fixed"
  beam_search = True
  # The positional tables' shapes (model.max_len rows) and which tables there are.
  fixed_on_resume = ("model.max_len", "model.positions")

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    m = config.model
    for key, off in (("mem_len", 0), ("clamp_len", 0), ("same_length", False)):
      if m[key] != off:
        raise UserError(f"config.model.{key}={m[key]} is for config.model.family=xl only "
                        f"(the fixed family has no memory)")
    # A window of data.seq_len takes rows [0, data.seq_len) of the positional table (rope has none).
    if m.positions != "rope" and config.data.seq_len > m.max_len:
      raise UserError(f"config.data.seq_len={config.data.seq_len} must be <= config.model.max_len="
                      f"{m.max_len}, the rows of the positional table (model.positions={m.positions})")

  def build(self, cfg: ModelConfig, deterministic: bool = True, all_layers: bool = False) -> Transformer:
    return Transformer(cfg, deterministic=deterministic, all_layers=all_layers)

  def decoder(self, module: nn.Module, context: int) -> base.Decoder:
    def step(variables, tokens_BxT, cache, index):
      return module.apply(variables, tokens_BxT, cache, index, method="decode")

    def reorder(cache, parents_G):  # init_cache's layout: LxBxCxNxH, the rows on axis 1.
      return jax.tree.map(lambda x: jnp.take(x, parents_G, axis=1), cache)
    return base.Decoder(step=step, init_state=lambda _, batch_size: module.cfg.init_cache(batch_size, context),
                        recurrent=False, reorder=reorder)


FAMILY = FixedFamily()
