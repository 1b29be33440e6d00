"""The training loss: the three auxiliary losses of Al-Rfou et al. (2019), weighted by the step.

  1. multiple positions: the next character is predicted at every position, not just the last;
  2. intermediate layers: layer l < n predicts too, until step l/(2n) of training;
  3. multiple targets: each position also predicts k = 2..K characters ahead, weight 0.5 each.

The total loss is sum over layers l and targets k of w[l, k] * nll[l, k] (each nll against
label-smoothed targets when loss.label_smoothing > 0), divided by the number of layers whose
loss is on at that step when loss.layer_reduction is "mean" (so its scale does not grow with
depth); bpc is the last layer's next-character nll, never smoothed, over ln 2. Weights are
computed from the step with jnp ops, inside jit.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from chartx.families import layers, registry
from chartx.errors import UserError


LAYER_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  num_layers: int
  num_steps: int  # The horizon of the intermediate-layer schedule.
  multiple_positions: bool = True
  intermediate_layers: bool = True
  num_targets: int = 1  # Characters ahead predicted at each position (1: next only).
  aux_target_weight: float = 0.5
  label_smoothing: float = 0.0  # Mass spread uniformly over the vocabulary in the training targets.
  layer_reduction: str = "sum"  # "sum" of the active layers' losses, or their "mean".

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossConfig":
    """The loss section's owner: checks every loss.* key (UserError naming it), then builds."""
    if int(config.loss.multiple_targets) < 1:
      raise UserError(f"config.loss.multiple_targets must be >= 1 (1 turns it off), "
                      f"got {config.loss.multiple_targets}")
    if not config.loss.aux_target_weight >= 0:
      raise UserError(f"config.loss.aux_target_weight must be >= 0, got {config.loss.aux_target_weight}")
    if not 0 <= config.loss.label_smoothing < 1:
      raise UserError(f"config.loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}")
    if config.loss.layer_reduction not in LAYER_REDUCTIONS:
      raise UserError(f"config.loss.layer_reduction must be one of {', '.join(LAYER_REDUCTIONS)}; "
                      f"got {config.loss.layer_reduction!r}")
    return cls(num_layers=config.model.num_layers, num_steps=config.train.num_steps,
               multiple_positions=config.loss.multiple_positions,
               intermediate_layers=config.loss.intermediate_layers,
               num_targets=config.loss.multiple_targets,
               aux_target_weight=config.loss.aux_target_weight,
               label_smoothing=float(config.loss.label_smoothing),
               layer_reduction=config.loss.layer_reduction)


def layer_stop_steps(cfg: LossConfig) -> list[int]:
  """First step at which layer l = 1..n no longer contributes; the last layer never stops.

  Layer l < n stops once step >= l / (2n) * num_steps; exact integer ceiling, so the boundary
  never depends on float rounding.
  """
  n = cfg.num_layers
  stops = [-(-layer * cfg.num_steps // (2 * n)) if cfg.intermediate_layers else 0
           for layer in range(1, n)]
  return stops + [jnp.iinfo(jnp.int32).max]


def loss_weights(step: jax.Array, cfg: LossConfig) -> jax.Array:
  """w_LxK: layer weight (1 or 0 by the schedule) times target weight (1, then aux_target_weight)."""
  active_L = (step < jnp.asarray(layer_stop_steps(cfg), jnp.int32)).astype(jnp.float32)
  target_K = jnp.asarray([1.0] + [cfg.aux_target_weight] * (cfg.num_targets - 1), jnp.float32)
  return active_L[:, None] * target_K[None, :]


def targets(windows_BxS: jax.Array, seq_len: int, num_targets: int) -> jax.Array:
  """targets_KxBxT: the character k+1 ahead of each of the seq_len input positions."""
  return jnp.stack([windows_BxS[:, k + 1:k + 1 + seq_len] for k in range(num_targets)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """nll_BxT against targets with `smoothing` of their mass spread uniformly over the V classes:
  logsumexp(logits) - (1 - smoothing) logits[target] - smoothing mean(logits). Its gradient,
  softmax - the smoothed one-hot, is one fused pass (autodiff's is a scatter and several
  full-size passes over the BxTxV logits)."""
  return _cross_entropy_forward(logits_BxTxV, targets_BxT, smoothing)[0]


def _cross_entropy_forward(logits_BxTxV, targets_BxT, smoothing):
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  nll_BxT = log_z_BxT - target_logit_BxT
  if smoothing:
    nll_BxT = nll_BxT + smoothing * (target_logit_BxT - logits_BxTxV.mean(-1))
  return nll_BxT, (logits_BxTxV, log_z_BxT, targets_BxT)


def _cross_entropy_backward(smoothing, residuals, g_BxT):
  logits_BxTxV, log_z_BxT, targets_BxT = residuals
  is_target_BxTxV = jnp.arange(logits_BxTxV.shape[-1]) == targets_BxT[..., None]
  target_BxTxV = (1 - smoothing) * is_target_BxTxV + smoothing / logits_BxTxV.shape[-1]
  d_BxTxV = (jnp.exp(logits_BxTxV - log_z_BxT[..., None]) - target_BxTxV) * g_BxT[..., None]
  return d_BxTxV.astype(logits_BxTxV.dtype), None


cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def _nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array, position_weights_T: jax.Array,
         smoothing: float) -> jax.Array:
  """[loss, nll]: the mean over scored positions of the smoothed nll (what is minimized) and of
  the plain nll (what is reported; the same number when smoothing is 0)."""
  mean = lambda nll_BxT: (nll_BxT * position_weights_T).sum(-1).mean() / position_weights_T.sum()
  loss = mean(cross_entropy(logits_BxTxV, targets_BxT, smoothing))
  nll = mean(jax.lax.stop_gradient(cross_entropy(logits_BxTxV, targets_BxT))) if smoothing else loss
  return jnp.stack([loss, nll])


def layer_nlls(model_cfg: layers.ModelConfig, heads: layers.Heads, h_LxBxTxD: jax.Array,
               targets_KxBxT: jax.Array, multiple_positions: bool = True,
               label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(loss_LxK, nll_LxK): the mean negative log-likelihood (nats) of every layer's every
  classifier, against label-smoothed targets (minimized) and the true ones (reported).

  With model.remat (memory over speed) it maps over the layers, recomputing each layer's logits
  in the backward pass, so only one layer's logits exist at a time; without, all layers' heads
  run as one batched product and their logits are kept for the backward pass.
  """
  seq_len = h_LxBxTxD.shape[2]
  # Ablation of aux loss 1: score only the last position of each window.
  position_weights_T = (jnp.ones(seq_len) if multiple_positions
                        else jnp.zeros(seq_len).at[-1].set(1.0))

  def one_layer(args):
    head, h_BxTxD = args
    head = head.replace(embedding=heads.embedding)  # Shared by the layers, so not mapped over.
    return jnp.stack([
        _nll(head.logits(model_cfg, h_BxTxD, k), targets_KxBxT[k], position_weights_T, label_smoothing)
        for k in range(targets_KxBxT.shape[0])])  # Kx2

  per_layer = (heads.replace(embedding=None), h_LxBxTxD)
  with jax.named_scope("heads"):  # A label for profiles.
    if model_cfg.remat == "none":
      both_LxKx2 = jax.vmap(one_layer)(per_layer)
    else:
      both_LxKx2 = jax.lax.map(jax.checkpoint(one_layer), per_layer)
  return both_LxKx2[..., 0], both_LxKx2[..., 1]


def compute_loss(model: Any, cfg: LossConfig, params: Any, windows_BxS: jax.Array,
                 weights_LxK: jax.Array, rng: jax.Array | None,
                 memory: Any = None) -> tuple[jax.Array, tuple[jax.Array, Any]]:
  """(total loss, (nll_LxK, memory)) of windows of T inputs and K targets; rng: dropout's key
  (None: none). model: the family's module (registry.build); memory: the family's memory of the
  windows' streams, which the model reads and returns updated (None for a family without one, and
  then None back). Without intermediate layers only the last layer runs its heads (L = 1)."""
  num_targets = model.cfg.num_targets
  seq_len = windows_BxS.shape[1] - num_targets
  inputs_BxT = windows_BxS[:, :seq_len]
  targets_KxBxT = targets(windows_BxS, seq_len, num_targets)
  variables = {"params": params}
  net = model.clone(deterministic=rng is None, all_layers=cfg.intermediate_layers)
  rngs = {} if rng is None else {"dropout": rng}
  h, memory = registry.get(model.cfg.family).apply(net, variables, inputs_BxT, memory, rngs)
  heads = model.apply(variables, method="heads")
  if not cfg.intermediate_layers:
    h, weights_LxK, heads = h[None], weights_LxK[-1:], heads.layer(slice(-1, None))
  loss_LxK, nll_LxK = layer_nlls(model.cfg, heads, h, targets_KxBxT, cfg.multiple_positions,
                                 cfg.label_smoothing)
  total = (weights_LxK * loss_LxK).sum()
  if cfg.layer_reduction == "mean":
    total = total / weights_LxK[:, 0].sum()  # Column 0 (next character, weight 1): active layers.
  return total, (nll_LxK, memory)


def bits(nats: jax.Array) -> jax.Array:
  return nats / math.log(2)
