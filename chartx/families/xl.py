"""Transformer-XL (Dai, Yang, Yang, Carbonell, Le, Salakhutdinov; ACL 2019): config.model.family="xl".

The same pre-LayerNorm residual stack, classifiers (layers.Heads) and building blocks
(chartx.families.layers) as the fixed-context family (chartx.families.fixed), with the XL layer:

Segment-level recurrence. The text is read in consecutive segments of T characters. Layer l of a
segment attends with queries from the segment's T positions only, over keys and values of the
C = M + T positions [memory of layer l; the segment's input to layer l]: the memory is the
input of layer l at the M positions before the segment, kept from the previous segments under
stop_gradient (no gradient reaches an earlier segment). The concatenation is layer-normed as
the pre-LN layer's input, and the new memory is the last M positions of [memory; input] of every
layer (Memory). Nothing in the model is an absolute position, so a memory can follow a segment
anywhere in the text, and an evaluation can use a longer memory than training did.

Relative positional attention. The score of query i for key j, at distance i - j >= 0, is the
paper's content term plus its position term:
    (q_i + u) . k_j  +  (q_i + v) . (W_R R_{i-j}),   scaled by 1/sqrt(H) as usual,
where q, k are the query and key projections, R_d is the sinusoid of distance d (Vaswani et
al.'s encoding of d: sines then cosines at the frequencies 1/10000^(2k/D)), W_R (DxNxH) is each
layer's own projection of it, and u, v (NxH) are learned biases that replace the query's
position: a content bias u (how much key j matters whatever its distance) and a position bias v
(how much distance i - j matters whatever the content). u and v are shared by all layers, as in
the paper (its equation has one u and one v) and the public code's defaults (its TensorFlow code
has a flag, untie_r, to give each layer its own); W_R is per layer. u and v start at zero (plain
content attention); the public code draws them from N(0, 0.02).

The relative shift. The position term is computed once per (query, distance) instead of per
(query, key): the C distances C-1, C-2, ..., 0 (descending: the farthest key first) are encoded
and projected once per layer (R: CxD, shared by the batch), multiplied with every query into a
TxC array whose row i holds query i's scores for those distances, and then shifted so that
column j of row i holds distance M + i - j: pad one zero column on the left (Tx(C+1)), view the
same numbers as (C+1)xT, drop the first row, and view the rest as TxC. Row i then starts T - 1 -
i entries further into the original row, which is exactly the shift that turns "distance
index" into "key index". Entries with j > M + i (future keys) hold leftovers of the next row
and are masked. No TxC gather: a pad and two reshapes (relative_shift).

clamp_len (> 0): distances above clamp_len use the encoding of clamp_len, so a model evaluated
with a longer memory than it was trained with need not meet the encodings of distances it never
saw (with clamp_len at most training's longest distance, mem_len + seq_len - 1).

same_length: every query sees the same number of keys, mem_len + 1 (itself and the mem_len
positions before it), where plain XL gives query i of the segment M + i + 1 keys (the later
queries of a segment see more). This is the public TensorFlow code's mask (its PyTorch code's
same_length mask keeps one key fewer, mem_len). A segment of one character (generation) sees
M + 1 keys either way. With same_length, reading a text in segments of any length with a
memory of mem_len rows gives the same results as one forward pass over the whole text in which
every layer attends to the last mem_len + 1 positions only (tests/test_xl.py).

Attention runs through jax.nn.dot_product_attention with the position term (pre-scaled by
1/sqrt(H)) as its bias and a mask for causality, invalid memory rows (Memory.valid_B) and
same_length: implementation "xla" or "cudnn" (model.attention; cuDNN's kernel with a bias
wants even T and C when training; splash has no bias, and ModelConfig.from_config refuses it).

Inference's memory (Cache). Training must project the memory's keys and values again every
segment: its gradient reaches W_k and W_v through them. Evaluation and generation need no
gradient, so their memory (XLTransformer.init_cache, XLFamily.inference_memory) keeps every
layer's keys and values already projected, in a ring of mem_len slots: a step of T positions
attends over the ring and its own T keys, then writes them over the ring's oldest T (nothing is
copied or moved); the relative keys W_R R of the mem_len + T distances are projected once, when
the cache is made. A segment then projects only its own T positions, and a generated character
one: its cost is the attention over the memory, not its projection (tests/test_xl.py checks it
against training's Memory).

Dropout, where the public code has it: on the embedded input, on the relative encodings R, and on
each residual branch (as in the fixed family). No absolute positions, so model.max_len and
model.positions play no part.
"""

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from chartx import data, sharding
from chartx.errors import UserError
from chartx.families import base, layers
from chartx.matmul import matmul


@flax.struct.dataclass
class Memory:
  """What a segment leaves to the next: every layer's input at the last M positions."""
  h_LxBxMxD: jax.Array  # Layer l's input at the last M positions, oldest first; the compute dtype.
  valid_B: jax.Array  # int32 per row: the last valid_B of the M rows hold real positions (0: empty).


@flax.struct.dataclass
class Cache:
  """Inference's memory (evaluation and generation; training carries Memory, whose gradient
  reaches W_k and W_v): every layer's keys and values of the last M positions already projected,
  in a ring of M slots, so a step of T positions projects only its own. A step attends over the
  ring and its own T keys, then writes them over the ring's oldest in place (nothing else is
  copied or moved); `start` is the slot of the oldest. The relative keys W_R R of the M + T
  distances a step sees are projected once, when the cache is made (XLTransformer.init_cache),
  for steps of exactly T positions."""
  # Heads before slots: with one query (generation), XLA:CPU's products over the slots then read
  # contiguous rows, several times faster than over MxNxH.
  k_LxBxNxMxH: jax.Array
  v_LxBxNxMxH: jax.Array
  rk_LxNxCxH: jax.Array  # Every layer's W_R R of the distances C-1, ..., 0 (C = M + T).
  valid_B: jax.Array  # As Memory's: real positions among the M before the step.
  start: jax.Array  # int32 scalar.


def relative_encodings(num_keys: int, d_model: int, clamp_len: int = 0) -> jax.Array:
  """R_CxD (float32): the sinusoid of the distances C-1, C-2, ..., 0 (the farthest key's first),
  each above clamp_len (when > 0) replaced by clamp_len."""
  distance_C = jnp.arange(num_keys - 1, -1, -1, dtype=jnp.float32)
  if clamp_len > 0:
    distance_C = jnp.minimum(distance_C, clamp_len)
  frequency_D2 = 1.0 / 10000 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
  angle_CxD2 = distance_C[:, None] * frequency_D2[None, :]
  return jnp.concatenate([jnp.sin(angle_CxD2), jnp.cos(angle_CxD2)], axis=-1)


def relative_shift(x_BxNxTxC: jax.Array) -> jax.Array:
  """Row i of x holds query i's scores for the distances C-1, ..., 0; returns them by key: entry
  (i, j) = x[i, j + T - 1 - i], the score for distance M + i - j (M = C - T), for j <= M + i.
  Entries with j > M + i are leftovers (mask them). A pad and reshapes, no gather."""
  *lead, T, C = x_BxNxTxC.shape
  padded = jnp.pad(x_BxNxTxC, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
  return padded.reshape(*lead, C + 1, T)[..., 1:, :].reshape(*lead, T, C)


def attention_mask(seq_len: int, mem_rows: int, valid_B: jax.Array, window: int | None) -> jax.Array:
  """mask_Bx1xTxC: query t (key index M + t) sees key c when c is not in the future (distance
  d = M + t - c >= 0), c is a valid memory row (c >= M - valid_B) or in the segment, and, with
  window (same_length: mem_len), d <= window."""
  distance_TxC = mem_rows + jnp.arange(seq_len)[:, None] - jnp.arange(mem_rows + seq_len)[None, :]
  visible_TxC = distance_TxC >= 0
  if window is not None:
    visible_TxC &= distance_TxC <= window
  valid_BxC = jnp.arange(mem_rows + seq_len)[None, :] >= (mem_rows - valid_B)[:, None]
  return (visible_TxC[None] & valid_BxC[:, None, :])[:, None]


def relative_attention(q_BxTxNxH: jax.Array, k_BxCxNxH: jax.Array, value_BxCxNxH: jax.Array,
                       rk_CxNxH: jax.Array, content_bias_NxH: jax.Array, position_bias_NxH: jax.Array,
                       mask_Bx1xTxC: jax.Array, impl: str = "xla") -> jax.Array:
  """softmax(((q + u) k^T + relative_shift((q + v) rk^T)) / sqrt(H), masked) value: BxTxNxH in
  q's dtype (rk_CxNxH: W_R R of the distances C-1..0; u, v: the content and position biases).
  The softmax is computed in float32; impl: "xla" or "cudnn" (jax.nn.dot_product_attention's)."""
  dtype = q_BxTxNxH.dtype
  scale = 1 / math.sqrt(q_BxTxNxH.shape[-1])
  qv_BxTxNxH = q_BxTxNxH + position_bias_NxH.astype(dtype)
  position_BxNxTxC = relative_shift(jnp.einsum("btnh,cnh->bntc", qv_BxTxNxH, rk_CxNxH.astype(dtype),
                                               preferred_element_type=jnp.float32)) * scale
  if impl == "cudnn":  # cuDNN takes the bias in the inputs' 16-bit dtype.
    position_BxNxTxC = position_BxNxTxC.astype(dtype)
  return jax.nn.dot_product_attention(q_BxTxNxH + content_bias_NxH.astype(dtype), k_BxCxNxH, value_BxCxNxH,
                                      bias=position_BxNxTxC, mask=mask_Bx1xTxC, scale=scale,
                                      implementation=impl)


def cached_attention(q_BxTxNxH: jax.Array, rings: tuple[jax.Array, jax.Array], layer: jax.Array,
                     new: tuple[jax.Array, jax.Array], rk_NxCxH: jax.Array, content_bias_NxH: jax.Array,
                     position_bias_NxH: jax.Array, mask_Bx1xTxC: jax.Array, start: jax.Array) -> jax.Array:
  """relative_attention over layer `layer` of a Cache's rings (k, v)_LxBxNxMxH, whose slot `start`
  holds the oldest key, and the step's own new (k, v)_BxNxTxH: keys in the order [ring slots;
  new], the mask too. The rings come whole, not the layer's slice: a slice would be copied.
  Written out in the ring's heads-first layout rather than through jax.nn.dot_product_attention,
  whose key layout made XLA:CPU transpose every layer's keys and values each step (about 3x the
  time at one query).

  On the CPU, a segment (T > 1) is attended one (row, head) at a time: XLA:CPU writes each
  elementwise pass (shift, roll, mask, softmax) of the B x N x T x C scores out to memory, and
  one head's T x C fits in the caches where all of them (tens of MB at C = 3,927) do not: at C =
  3,927 a layer's attention took a fifth of the time (docs/results.md). Elsewhere, and for one
  query, all at once."""
  T = q_BxTxNxH.shape[1]
  q_BxNxTxH = jnp.transpose(q_BxTxNxH, (0, 2, 1, 3))
  by_head = (rk_NxCxH, content_bias_NxH, position_bias_NxH)
  mask_BxTxC = mask_Bx1xTxC[:, 0]
  if T > 1 and sharding.platform() == "cpu":
    attend = _one_head_at_a_time
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and math.prod(mesh.shape[a] for a in sharding.BATCH_AXES) > 1:
      # Each device loops over its own rows (a loop over the sharded rows would gather them all).
      rows, ring_rows, whole = (PartitionSpec(sharding.BATCH_AXES), PartitionSpec(None, sharding.BATCH_AXES),
                                PartitionSpec())
      attend = jax.shard_map(attend, in_specs=(rows, (ring_rows, ring_rows), whole, (rows, rows)) + (whole,) * 3
                             + (rows, whole), out_specs=rows)
    out_BxNxTxH = attend(q_BxNxTxH, rings, layer, new, *by_head, mask_BxTxC, start)
  else:
    heads = jax.vmap(_head_attention, in_axes=(0,) * 8 + (None, None))
    rows = jax.vmap(heads, in_axes=(0,) * 5 + (None,) * 3 + (0, None))
    out_BxNxTxH = rows(q_BxNxTxH, *(ring_LxBxNxMxH[layer] for ring_LxBxNxMxH in rings), *new, *by_head,
                       mask_BxTxC, start)
  return jnp.transpose(out_BxNxTxH, (0, 2, 1, 3))


def _one_head_at_a_time(q_BxNxTxH: jax.Array, rings: tuple[jax.Array, jax.Array], layer: jax.Array,
                        new: tuple[jax.Array, jax.Array], rk_NxCxH: jax.Array, content_bias_NxH: jax.Array,
                        position_bias_NxH: jax.Array, mask_BxTxC: jax.Array, start: jax.Array) -> jax.Array:
  """_head_attention of every row and head in turn (lax.map): out_BxNxTxH. Each turn slices its
  own keys and values out of the whole rings."""
  B, N, T, H = q_BxNxTxH.shape
  flat = lambda a_BxNx_: a_BxNx_.reshape(B * N, *a_BxNx_.shape[2:])
  def one(index_and_slices):
    index, *slices = index_and_slices
    row, head = index // N, index % N
    ring = (ring_LxBxNxMxH[layer, row, head] for ring_LxBxNxMxH in rings)
    by_head = (a[head] for a in (rk_NxCxH, content_bias_NxH, position_bias_NxH))
    return _head_attention(slices[0], *ring, *slices[1:], *by_head, mask_BxTxC[row], start)
  return jax.lax.map(one, (jnp.arange(B * N), *map(flat, (q_BxNxTxH, *new)))).reshape(B, N, T, H)


def _head_attention(q_TxH: jax.Array, k_MxH: jax.Array, value_MxH: jax.Array, new_k_TxH: jax.Array,
                    new_value_TxH: jax.Array, rk_CxH: jax.Array, content_bias_H: jax.Array,
                    position_bias_H: jax.Array, mask_TxC: jax.Array, start: jax.Array) -> jax.Array:
  """cached_attention of one row and head: out_TxH. The position scores are computed by distance
  as in relative_attention, then the memory's rolled from key order to ring order. The memory's
  keys and the step's own are scored apart (no concatenated copy), and the softmax's sum divides
  the weighted values (T x H), not the probabilities (T x C)."""
  M = k_MxH.shape[0]
  dtype = q_TxH.dtype
  scale = 1 / math.sqrt(q_TxH.shape[-1])
  scores = lambda q, k: jnp.einsum("th,ch->tc", q, k, preferred_element_type=jnp.float32)
  qu_TxH = (q_TxH + content_bias_H.astype(dtype)) * scale
  position_TxC = relative_shift(scores((q_TxH + position_bias_H.astype(dtype)) * scale, rk_CxH.astype(dtype)))
  masked = lambda scores, mask: jnp.where(mask, scores, -jnp.inf)  # Every query sees itself.
  memory_TxM = masked(scores(qu_TxH, k_MxH) + jnp.roll(position_TxC[:, :M], start, axis=-1), mask_TxC[:, :M])
  own_TxT = masked(scores(qu_TxH, new_k_TxH) + position_TxC[:, M:], mask_TxC[:, M:])
  max_Tx1 = jnp.maximum(memory_TxM.max(-1, keepdims=True), own_TxT.max(-1, keepdims=True))
  memory_TxM, own_TxT = jnp.exp(memory_TxM - max_Tx1), jnp.exp(own_TxT - max_Tx1)
  weigh = lambda p, v: jnp.einsum("tc,ch->th", p.astype(dtype), v, preferred_element_type=jnp.float32)
  out_TxH = weigh(memory_TxM, value_MxH) + weigh(own_TxT, new_value_TxH)
  return (out_TxH / (memory_TxM.sum(-1, keepdims=True) + own_TxT.sum(-1, keepdims=True))).astype(dtype)


def ring_write(ring_LxBxNxMxH: jax.Array, new_LxBxNxTxH: jax.Array, start: jax.Array) -> jax.Array:
  """The ring with every layer's T new keys (or values) written over its oldest T, slots start,
  ..., start + T - 1 (mod M); T >= M: the last M of them, the oldest at slot 0."""
  M, T = ring_LxBxNxMxH.shape[3], new_LxBxNxTxH.shape[3]
  if T >= M:
    return new_LxBxNxTxH[:, :, :, T - M:]
  return ring_LxBxNxMxH.at[:, :, :, (start + jnp.arange(T)) % M].set(new_LxBxNxTxH)


def _last_rows(x_BxCxD: jax.Array, rows: int) -> jax.Array:
  """The last `rows` positions of x (zero rows in front when x has fewer)."""
  length = x_BxCxD.shape[1]
  if length >= rows:
    return x_BxCxD[:, length - rows:]
  return jnp.pad(x_BxCxD, ((0, 0), (rows - length, 0), (0, 0)))


class XLBlock(nn.Module):
  """One XL layer: relative attention over [memory; input] -> feed-forward, pre-LN residuals."""
  cfg: layers.ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, memory: jax.Array | tuple[jax.Array, ...], r_CxD: jax.Array | None,
               content_bias_NxH: jax.Array, position_bias_NxH: jax.Array, mask_Bx1xTxC: jax.Array,
               start: jax.Array | None = None) -> tuple[jax.Array, jax.Array | tuple[jax.Array, ...]]:
    """(x_BxTxD, the layer's new memory). memory: the layer's Memory rows mem_BxMxD, whose keys
    and values are projected here with x's (the new memory: the last mem_len rows of [mem; x],
    before the norm); or, with start, every layer's Cache rings, this layer's index and its
    relative keys (k_LxBxNxMxH, v_LxBxNxMxH, layer, rk_NxCxH) (the new memory: x's keys and values
    (k, v)_BxNxTxH, for ring_write), r_CxD None and the mask in [ring; x] order."""
    cfg = self.cfg
    N, H, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    B, T = x_BxTxD.shape[:2]
    in_init = layers.head_in_init(cfg)
    kernel = lambda name: self.param(name, in_init, (D, N, H)).reshape(D, N * H)
    project = lambda h_BxRxD, name: matmul(h_BxRxD, kernel(name)).reshape(B, -1, N, H)
    if start is None:
      M = memory.shape[1]
      mem_BxMxD = nn.with_logical_constraint(memory, ("batch", "length", "embed"))
      cat_BxCxD = jnp.concatenate([mem_BxMxD.astype(x_BxTxD.dtype), x_BxTxD], axis=1)
      with jax.named_scope("layer_norm"):
        h_BxCxD = layers.layer_norm(cfg, "attention_norm")(cat_BxCxD)
      with jax.named_scope("projections"):
        q_BxTxNxH = project(h_BxCxD[:, M:], "query")
        k_BxCxNxH, value_BxCxNxH = project(h_BxCxD, "key"), project(h_BxCxD, "value")
        rk_CxNxH = matmul(r_CxD.astype(x_BxTxD.dtype), kernel("position_key")).reshape(M + T, N, H)
      with jax.named_scope("attention"):
        a_BxTxNxH = relative_attention(q_BxTxNxH, k_BxCxNxH, value_BxCxNxH, rk_CxNxH, content_bias_NxH,
                                       position_bias_NxH, mask_Bx1xTxC, impl=cfg.attention)
      new_memory = _last_rows(cat_BxCxD, cfg.mem_len)
    else:
      k_LxBxNxMxH, v_LxBxNxMxH, layer, rk_NxCxH = memory
      with jax.named_scope("layer_norm"):
        h_BxTxD = layers.layer_norm(cfg, "attention_norm")(x_BxTxD)
      with jax.named_scope("projections"):
        q_BxTxNxH = project(h_BxTxD, "query")
        heads_first = lambda a_BxTxNxH: jnp.transpose(a_BxTxNxH, (0, 2, 1, 3))
        new_memory = (heads_first(project(h_BxTxD, "key")), heads_first(project(h_BxTxD, "value")))
      with jax.named_scope("attention"):
        a_BxTxNxH = cached_attention(q_BxTxNxH, (k_LxBxNxMxH, v_LxBxNxMxH), layer, new_memory, rk_NxCxH,
                                     content_bias_NxH, position_bias_NxH, mask_Bx1xTxC, start)
    x_BxTxD = layers.attention_out_residual(self, x_BxTxD, a_BxTxNxH)
    x_BxTxD = layers.feed_forward_residual(cfg, self.deterministic, x_BxTxD)
    return x_BxTxD, new_memory


class _ScanBody(nn.Module):
  """Adapts XLBlock to nn.scan: the carry is x; each layer's memory is scanned in, its new memory
  (and its output, when kept) scanned out."""
  cfg: layers.ModelConfig
  deterministic: bool
  keep_all_layers: bool

  @nn.compact
  def __call__(self, x_BxTxD, memory, *broadcast):
    block = layers.layer_cls(self.cfg, XLBlock)(self.cfg, self.deterministic, name="block")
    *broadcast, rings = broadcast
    if rings is not None:  # A Cache: memory is (layer, rk_NxCxH); every layer's rings, read in place.
      memory = (*rings, *memory)
    x_BxTxD, new_memory = block(x_BxTxD, memory, *broadcast)
    return x_BxTxD, (new_memory, x_BxTxD if self.keep_all_layers else None)


def init_memory(cfg: layers.ModelConfig, batch_size: int) -> Memory:
  """An empty memory: mem_len zero rows per layer and row, none of them valid."""
  h_LxBxMxD = jnp.zeros((cfg.num_layers, batch_size, cfg.mem_len, cfg.d_model), cfg.compute_dtype)
  return Memory(h_LxBxMxD=h_LxBxMxD, valid_B=jnp.zeros((batch_size,), jnp.int32))


class XLTransformer(nn.Module):
  """(tokens_BxT, memory) -> (the residual stream after every layer (all_layers) or the last,
  the new memory). Attributes as fixed.Transformer's; build it with registry.build."""
  cfg: layers.ModelConfig
  deterministic: bool = True
  all_layers: bool = False

  def setup(self):
    cfg = self.cfg
    self.embedding = layers.embedding_param(self, cfg)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim"))
    # u and v, shared by every layer (the paper); zero at first: plain content attention.
    self.content_bias = self.param("content_bias", bias_init, (cfg.num_heads, cfg.head_dim))
    self.position_bias = self.param("position_bias", bias_init, (cfg.num_heads, cfg.head_dim))
    self.dropout = nn.Dropout(cfg.dropout)
    if cfg.scan_layers:
      # Each layer's memory scanned in; R, u, v, the mask and a Cache's start and rings the same for
      # every layer.
      stack = layers.scanned(_ScanBody, cfg, num_broadcast=6)
      self.layers = stack(cfg, self.deterministic, self.all_layers)
    else:
      self.layers = [layers.layer_cls(cfg, XLBlock)(cfg, self.deterministic)
                     for _ in range(cfg.num_layers)]
    self.classifiers = layers.head_params(self, cfg, self.embedding)

  def __call__(self, tokens_BxT: jax.Array,
               memory: Memory | Cache | None = None) -> tuple[jax.Array, Memory | Cache]:
    """(h_LxBxTxD if all_layers else h_BxTxD, before the heads' norm; the new memory). A Memory
    (training's) becomes the last mem_len positions of [memory; this segment] of every layer's
    input; a Cache (inference's) has this segment's keys and values written over its oldest;
    valid_B = min(mem_len, valid_B + T). memory None: no memory (as an empty one)."""
    cfg = self.cfg
    B, T = tokens_BxT.shape
    if memory is None:
      memory = Memory(h_LxBxMxD=jnp.zeros((cfg.num_layers, B, 0, cfg.d_model), cfg.compute_dtype),
                      valid_B=jnp.zeros((B,), jnp.int32))
    x_BxTxD = self.dropout(layers.embed(cfg, self.embedding, tokens_BxT), deterministic=self.deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    window = cfg.mem_len if cfg.same_length else None
    biases = (self.content_bias, self.position_bias)
    if isinstance(memory, Cache):
      M, C = cfg.mem_len, memory.rk_LxNxCxH.shape[2]
      if C != M + T:
        raise ValueError(f"a Cache for {C} distances (mem_len {M}) takes steps of {C - M} positions, got {T}")
      # Keys in the order [ring slots; the step's own]: the memory's part rolled to ring order.
      mask_Bx1xTxC = attention_mask(T, M, memory.valid_B, window)
      mask_Bx1xTxC = jnp.concatenate([jnp.roll(mask_Bx1xTxC[..., :M], memory.start, axis=-1),
                                      mask_Bx1xTxC[..., M:]], axis=-1)
      # The rings are read in place by every layer and written once, after the last: scanned in
      # and out, or written inside the layers' loop, XLA would copy them every layer.
      rings = (memory.k_LxBxNxMxH, memory.v_LxBxNxMxH)
      x_BxTxD, (k_LxBxNxTxH, v_LxBxNxTxH), h_LxBxTxD = self._layers(
          x_BxTxD, (jnp.arange(cfg.num_layers), memory.rk_LxNxCxH),
          (None, *biases, mask_Bx1xTxC, memory.start, rings))
      new_memory = memory.replace(k_LxBxNxMxH=ring_write(rings[0], k_LxBxNxTxH, memory.start),
                                  v_LxBxNxMxH=ring_write(rings[1], v_LxBxNxTxH, memory.start),
                                  start=(memory.start + T) % M if 0 < T < M else jnp.zeros((), jnp.int32),
                                  valid_B=jnp.minimum(M, memory.valid_B + T))
    else:
      M = memory.h_LxBxMxD.shape[2]
      memory_axes = ("layers", "batch", "length", "embed")
      mem_LxBxMxD = nn.with_logical_constraint(
          jax.lax.stop_gradient(memory.h_LxBxMxD.astype(cfg.compute_dtype)), memory_axes)
      r_CxD = self.dropout(relative_encodings(M + T, cfg.d_model, cfg.clamp_len),
                           deterministic=self.deterministic)
      mask_Bx1xTxC = attention_mask(T, M, memory.valid_B, window)
      x_BxTxD, new_LxBxMxD, h_LxBxTxD = self._layers(x_BxTxD, mem_LxBxMxD,
                                                     (r_CxD, *biases, mask_Bx1xTxC, None, None))
      new_LxBxMxD = nn.with_logical_constraint(jax.lax.stop_gradient(new_LxBxMxD), memory_axes)
      new_memory = Memory(h_LxBxMxD=new_LxBxMxD, valid_B=jnp.minimum(cfg.mem_len, memory.valid_B + T))
    return (h_LxBxTxD if self.all_layers else x_BxTxD), new_memory

  def _layers(self, x_BxTxD: jax.Array, memory_L: Any, broadcast: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """(x after every layer, every layer's new memory stacked, h_LxBxTxD or None): memory_L has
    each layer's memory (XLBlock's) on a leading axis, or for a Cache (the layer indices, its
    rk_LxNxCxH); broadcast: XLBlock's other arguments, then a Cache's rings (None: none)."""
    if self.cfg.scan_layers:
      x_BxTxD, (new_L, h_LxBxTxD) = self.layers(x_BxTxD, memory_L, *broadcast)
      return x_BxTxD, new_L, h_LxBxTxD
    *broadcast, rings = broadcast
    outputs, news = [], []
    for layer, block in enumerate(self.layers):
      memory = jax.tree.map(lambda a: a[layer], memory_L)
      if rings is not None:  # A Cache: memory_L is (layer indices, rk_LxNxCxH), as _ScanBody's.
        memory = (*rings, *memory)
      x_BxTxD, new = block(x_BxTxD, memory, *broadcast)
      outputs.append(x_BxTxD)
      news.append(new)
    new_L = jax.tree.map(lambda *a: jnp.stack(a), *news)
    return x_BxTxD, new_L, (jnp.stack(outputs) if self.all_layers else None)

  def init_cache(self, batch_size: int, seq_len: int) -> Cache:
    """An empty Cache of batch_size rows for steps of seq_len positions, with every layer's relative
    keys W_R R projected once, for the mem_len + seq_len distances a step sees (clamp_len applied)."""
    cfg = self.cfg
    N, H, D, L = cfg.num_heads, cfg.head_dim, cfg.d_model, cfg.num_layers
    C = cfg.mem_len + seq_len
    params = nn.unbox(self.variables["params"])
    if cfg.scan_layers:
      w_LxDxNxH = params["layers"]["block"]["position_key"]
    else:
      w_LxDxNxH = jnp.stack([params[f"layers_{layer}"]["position_key"] for layer in range(L)])
    r_CxD = relative_encodings(C, D, cfg.clamp_len).astype(cfg.compute_dtype)
    rk_LxCxNxH = jax.vmap(lambda w_DxNxH: matmul(r_CxD, w_DxNxH.reshape(D, N * H)))(w_LxDxNxH)
    rk_LxNxCxH = jnp.transpose(rk_LxCxNxH.reshape(L, C, N, H), (0, 2, 1, 3))
    zeros = jnp.zeros((L, batch_size, N, cfg.mem_len, H), cfg.compute_dtype)
    return Cache(k_LxBxNxMxH=zeros, v_LxBxNxMxH=zeros, rk_LxNxCxH=rk_LxNxCxH,
                 valid_B=jnp.zeros((batch_size,), jnp.int32), start=jnp.zeros((), jnp.int32))

  def heads(self) -> layers.Heads:
    """Every layer's classifiers (for a loss); inference uses heads().layer(-1)."""
    return self.classifiers

  def logits(self, tokens_BxT: jax.Array,
             memory: Memory | Cache | None = None) -> tuple[jax.Array, Memory | Cache]:
    """(the last layer's next-character logits_BxTxV, float32; the new memory). Generation is
    this with T = 1: its cost per character depends on mem_len, not on what came before."""
    h, new_memory = self(tokens_BxT, memory)
    return layers.last_layer_logits(self, h), new_memory


# The logical axes of each field of a Memory, which config.mesh.rules map to mesh axes as they do
# the parameters': rows of the batch (streams) split over the batch axes.
MEMORY_AXES = {"h_LxBxMxD": ("layers", "batch", "length", "embed"), "valid_B": ("batch",)}
CACHE_AXES = {"k_LxBxNxMxH": ("layers", "batch", "heads", "length", "head_dim"),
              "v_LxBxNxMxH": ("layers", "batch", "heads", "length", "head_dim"),
              "rk_LxNxCxH": ("layers", "heads", "length", "head_dim"), "valid_B": ("batch",)}


class XLFamily(base.Family):
  """Transformer-XL: a memory carried across steps on contiguous streams, recurrent evaluation
  (base.Recurrent), the memory as its decoding state (no beam search)."""
  name = "xl"
  # Its checkpoints also hold the memory: mem_len rows per layer for each of train.batch_size streams.
  fixed_on_resume = ("model.mem_len", "train.batch_size")

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    # No absolute positions: data.seq_len and eval.seq_len have no bound here (model.max_len is unused).
    m = config.model
    for key in ("mem_len", "clamp_len"):
      if m[key] < 0:
        raise UserError(f"config.model.{key} must be >= 0, got {m[key]}")
    if m.attention == "splash":
      raise UserError("config.model.attention=splash does not support config.model.family=xl "
                      "(XL's relative positions are an attention bias); use auto, xla or cudnn")
    if m.d_model % 2:
      raise UserError(f"config.model.d_model must be even for config.model.family=xl (sinusoidal "
                      f"relative positions), got {m.d_model}")
    if m.same_length and m.mem_len < 1:
      raise UserError("config.model.same_length needs config.model.mem_len >= 1 (with no memory, "
                      "every query would see only itself)")

  def attention(self, impl: str) -> str:
    return "xla" if impl == "splash" else impl  # Only from "auto" (check_config refuses it named).

  def build(self, cfg: layers.ModelConfig, deterministic: bool = True,
            all_layers: bool = False) -> XLTransformer:
    return XLTransformer(cfg, deterministic=deterministic, all_layers=all_layers)

  def init_memory(self, cfg: layers.ModelConfig, batch_size: int) -> Memory:
    memory = init_memory(cfg, batch_size)
    return memory.replace(**{name: nn.LogicallyPartitioned(getattr(memory, name), names)
                             for name, names in MEMORY_AXES.items()})

  def inference_memory(self, module: XLTransformer, params: Any, batch_size: int, seq_len: int) -> Cache:
    cache = module.apply({"params": params}, batch_size, seq_len, method="init_cache")
    return cache.replace(**{name: nn.LogicallyPartitioned(getattr(cache, name), names)
                            for name, names in CACHE_AXES.items()})

  def reset_memory(self, memory: Memory, reset_B: jax.Array) -> Memory:
    return memory.replace(valid_B=jnp.where(reset_B, 0, memory.valid_B))

  def apply(self, module, variables, inputs_BxT, memory, rngs):
    return module.apply(variables, inputs_BxT, memory, rngs=rngs)

  def check_train_data(self, num_chars: int, config: ml_collections.ConfigDict) -> None:
    data.segments_per_pass(num_chars, batch_size=config.train.batch_size, seq_len=config.data.seq_len,
                           num_targets=int(config.loss.multiple_targets))

  def train_batch(self, train_M, config, step, *, num_targets, process_index, process_count):
    # The next segment of each contiguous stream (its memory is in the state).
    return data.stream_batch(train_M, step=step, batch_size=config.train.batch_size,
                             seq_len=config.data.seq_len, num_targets=num_targets,
                             process_index=process_index, process_count=process_count)

  def check_eval_config(self, config: ml_collections.ConfigDict) -> None:
    e = config.eval
    if e.stride:
      raise UserError(f"config.eval.stride={e.stride} is the fixed family's sliding window; "
                      "model.family=xl evaluates recurrently (eval.seq_len, eval.mem_len): leave "
                      "eval.stride at 0")
    for key, low in (("seq_len", 0), ("mem_len", -1), ("clamp_len", -1)):
      if e[key] < low:
        raise UserError(f"config.eval.{key} must be >= {low} ({low}: as in training), got {e[key]}")
    resolved = self.protocol(config)
    if resolved.same_length and resolved.mem_len < 1:
      raise UserError(f"config.eval.same_length={e.same_length} needs a memory (eval.mem_len >= 1; "
                      f"it is {resolved.mem_len}): with none, every character would see only itself")

  def protocol(self, config: ml_collections.ConfigDict) -> base.Recurrent:
    e, m = config.eval, config.model
    seq_len = e.seq_len or config.data.seq_len
    same_length = m.same_length if e.same_length.lower() == "auto" else e.same_length.lower() == "true"
    return base.Recurrent(seq_len=seq_len, stride=seq_len,
                          mem_len=m.mem_len if e.mem_len == -1 else e.mem_len,
                          clamp_len=m.clamp_len if e.clamp_len == -1 else e.clamp_len,
                          same_length=same_length)

  def decoder(self, module: nn.Module, context: int) -> base.Decoder:
    del context  # The memory never fills.
    def step(variables, tokens_BxT, memory, index):
      del index  # Positions are relative.
      return module.apply(variables, tokens_BxT, memory, method="logits")
    init_state = lambda variables, batch_size: module.apply(variables, batch_size, 1, method="init_cache")
    return base.Decoder(step=step, init_state=init_state, recurrent=True)

  def flops_per_char(self, cfg: layers.ModelConfig, seq_len: int, intermediate_layers: bool = True,
                     batch_size: int = 1) -> float:
    """base.Family's count (T = seq_len, M = mem_len, per layer and character), on top of the same
    q, k, v, output and feed-forward count for the T current rows:
      - keys and values of the M memory rows, recomputed every segment: 2 x 6 d^2 M / T (the
        memory is stop-gradient, but the input gradient of these products still runs: it is
        the attention norm's parameters' gradient);
      - the positional projection W_R R of the M + T relative distances, computed once per batch
        for all batch_size rows (R is a constant): 4 d^2 (M + T) / (T x batch_size); the default
        batch_size 1 gives an upper bound;
      - attention: three products per (query, key) pair that a query sees (content scores,
        positional scores, the weighted values), 2 d each forward, x 3 with the backward pass:
        18 d per key, over M + T / 2 keys (the memory, and the causal half of the segment, as
        above), or M + 1 with same_length.
    """
    d, f, n, mem = cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.mem_len
    keys = mem + 1 if cfg.same_length else mem + seq_len / 2
    matmuls = 6 * n * (4 * d * d + 2 * d * f)
    matmuls += n * (12 * d * d * mem / seq_len + 4 * d * d * (mem + seq_len) / (seq_len * batch_size))
    attention = 18 * n * d * keys
    return float(matmuls + attention + cfg.heads_flops_per_char(intermediate_layers))


FAMILY = XLFamily()
