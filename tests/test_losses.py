"""The auxiliary losses: the l/(2n) schedule inside jit, each loss on/off, and a golden one-step test."""

import fractions
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chartx import losses, scoring, train
from chartx.errors import UserError


def _expected_active(layer: int, num_layers: int, num_steps: int, step: int) -> bool:
  """Layer l < n is on while step < l/(2n) of training, in exact rational arithmetic."""
  if layer == num_layers:
    return True
  return fractions.Fraction(step) < fractions.Fraction(layer * num_steps, 2 * num_layers)


@pytest.mark.parametrize("num_layers,num_steps", [(4, 80), (3, 7), (64, 4_000_000)])
def test_intermediate_layer_weights_follow_l_over_2n_inside_jit(num_layers, num_steps):
  cfg = losses.LossConfig(num_layers=num_layers, num_steps=num_steps, num_targets=2)
  weights_fn = jax.jit(functools.partial(losses.loss_weights, cfg=cfg))
  stops = losses.layer_stop_steps(cfg)
  # Every step at and around each layer's boundary, plus the ends.
  steps = {0, num_steps - 1, num_steps // 2}
  for stop in stops[:-1]:
    steps |= {max(stop - 1, 0), stop, stop + 1}
  for step in sorted(steps):
    w_LxK = np.asarray(weights_fn(jnp.int32(step)))
    for layer in range(1, num_layers + 1):
      expected = float(_expected_active(layer, num_layers, num_steps, step))
      assert w_LxK[layer - 1, 0] == expected, (layer, step)
      assert w_LxK[layer - 1, 1] == 0.5 * expected
  # By half-way every intermediate layer is off; the last is always on.
  half = np.asarray(weights_fn(jnp.int32((num_steps + 1) // 2)))
  assert half[:-1].sum() == 0 and half[-1, 0] == 1.0


def test_weights_off_when_the_intermediate_loss_is_switched_off():
  cfg = losses.LossConfig(num_layers=4, num_steps=100, intermediate_layers=False)
  w_LxK = np.asarray(losses.loss_weights(jnp.int32(0), cfg))
  np.testing.assert_array_equal(w_LxK[:, 0], [0, 0, 0, 1])


def _setup(config, seq_len=16, batch=4):
  task = train.make_task(config, 256)
  state = jax.jit(functools.partial(train.init_state, task, seq_len=seq_len))(jax.random.key(0))
  windows_BxS = jax.random.randint(jax.random.key(3), (batch, seq_len + config.loss.multiple_targets), 0, 256)
  return task, flax.linen.unbox(state), windows_BxS


def _loss(task, params, windows_BxS, step=0):
  weights = losses.loss_weights(jnp.int32(step), task.loss_cfg)
  loss, (nll_LxK, _) = losses.compute_loss(task.model, task.loss_cfg, params, windows_BxS, weights, None)
  return loss, nll_LxK


def test_each_auxiliary_loss_changes_the_total_only_when_switched_on(tiny_config):
  tiny_config.model.num_layers = 3
  tiny_config.loss.multiple_targets = 2
  task, state, windows = _setup(tiny_config)
  params = state.params
  full, nll_LxK = _loss(task, params, windows)
  # All on: every layer, next char + 0.5 x two ahead.
  np.testing.assert_allclose(full, nll_LxK[:, 0].sum() + 0.5 * nll_LxK[:, 1].sum(), rtol=1e-6)

  # Aux 2 off: only the last layer counts; its nlls are unchanged.
  tiny_config.loss.intermediate_layers = False
  task_2 = train.make_task(tiny_config, 256)
  no_inter, nll_last = _loss(task_2, params, windows)
  np.testing.assert_allclose(nll_last[0], nll_LxK[-1], rtol=1e-6)
  np.testing.assert_allclose(no_inter, nll_LxK[-1, 0] + 0.5 * nll_LxK[-1, 1], rtol=1e-6)
  assert not np.isclose(no_inter, full)

  # Past half-way the schedule has switched aux 2 off by itself: same total as switched off.
  late, _ = _loss(task, params, windows, step=tiny_config.train.num_steps - 1)
  np.testing.assert_allclose(late, no_inter, rtol=1e-6)

  # Aux 3 weight 0 (or K = 1): the total is the main next-character loss.
  tiny_config.loss.aux_target_weight = 0.0
  only_next, _ = _loss(train.make_task(tiny_config, 256), params, windows)
  np.testing.assert_allclose(only_next, nll_LxK[-1, 0], rtol=1e-6)

  # Aux 1 off: only the last position of each window is scored, a different number.
  tiny_config.loss.multiple_positions = False
  last_pos, _ = _loss(train.make_task(tiny_config, 256), params, windows)
  assert np.isfinite(last_pos) and not np.isclose(last_pos, only_next)


def test_last_position_only_loss_scores_only_the_last_position(tiny_config):
  tiny_config.loss.multiple_positions = False
  tiny_config.loss.multiple_targets = 1
  tiny_config.loss.intermediate_layers = False
  task, state, windows_BxS = _setup(tiny_config)
  loss, _ = _loss(task, state.params, windows_BxS)
  # The inference path's score, from the last position only vs from every position.
  score = scoring.model_score_fn(task.model)
  batch, seq_len = windows_BxS.shape[0], windows_BxS.shape[1] - 1
  last_nats, last_count = score(state.params, windows_BxS, jnp.full((batch,), seq_len - 1))
  all_nats, all_count = score(state.params, windows_BxS, jnp.zeros((batch,), jnp.int32))
  assert int(last_count) == batch and int(all_count) == batch * seq_len
  np.testing.assert_allclose(loss, last_nats / last_count, rtol=1e-5)
  assert not np.isclose(loss, all_nats / all_count)


def _numpy_forward_nll(params, tokens_BxT, targets_KxBxT, cfg):
  """An independent float64 NumPy implementation of the model and per-layer losses: nll_LxK."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  T = tokens_BxT.shape[1]
  H = cfg.head_dim

  def layer_norm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias

  x = p["embedding"][tokens_BxT]
  nll = np.zeros((cfg.num_layers, cfg.num_targets))
  causal = np.tril(np.ones((T, T), bool))
  for layer in range(cfg.num_layers):
    blk = jax.tree.map(lambda a: a[layer], p["layers"]["block"])
    x = x + blk["pos_embedding"][:T]
    h = layer_norm(x, blk["attention_norm"]["scale"], blk["attention_norm"]["bias"])
    q, k, v = (np.einsum("btd,dnh->bnth", h, blk[n]) for n in ("query", "key", "value"))
    scores = np.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(H)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    a = np.einsum("bnts,bnsh->btnh", probs, v)
    x = x + np.einsum("btnh,nhd->btd", a, blk["attention_out"])
    h = layer_norm(x, blk["mlp_norm"]["scale"], blk["mlp_norm"]["bias"])
    x = x + np.maximum(h @ blk["mlp_in"]["kernel"], 0) @ blk["mlp_out"]["kernel"]
    z = layer_norm(x, p["head_norm_scale"][layer], p["head_norm_bias"][layer])
    for target in range(cfg.num_targets):
      logits = z @ p["head_kernel"][layer, target] + p["head_bias"][layer, target]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
          - logits.max(-1, keepdims=True)
      nll[layer, target] = -np.take_along_axis(logp, targets_KxBxT[target][..., None], -1).mean()
  return nll


def test_golden_one_step(tiny_config):
  """Loss at init against an independent NumPy forward; the update against SGD with momentum."""
  tiny_config.model.num_layers = 2
  tiny_config.loss.multiple_targets = 2
  tiny_config.model.dropout = 0.0
  task, state, windows_BxS = _setup(tiny_config, seq_len=12, batch=3)
  seq_len = 12
  targets = np.asarray(losses.targets(windows_BxS, seq_len, 2))
  expected_nll = _numpy_forward_nll(state.params, np.asarray(windows_BxS[:, :seq_len]), targets, task.model_cfg)
  expected_loss = expected_nll[:, 0].sum() + 0.5 * expected_nll[:, 1].sum()

  step = jax.jit(functools.partial(train.train_step, task))
  new_state, metrics = step(state, windows_BxS, jax.random.key(0))
  np.testing.assert_allclose(metrics["nll"], expected_nll, rtol=2e-5)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=2e-5)
  np.testing.assert_allclose(metrics["bpc"], expected_nll[-1, 0] / np.log(2), rtol=2e-5)

  # First momentum step: trace = grad, so params move by exactly -lr * grad.
  grads = jax.jit(jax.grad(lambda p: _loss(task, p, windows_BxS)[0]))(state.params)
  lr = tiny_config.optimizer.learning_rate
  expected = jax.tree.map(lambda p, g: p - lr * g, state.params, grads)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert int(new_state.step) == 1
  np.testing.assert_array_equal(new_state.loss_weights,
                                losses.loss_weights(jnp.int32(1), task.loss_cfg))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_and_its_gradient_equal_log_softmax_autodiff(smoothing):
  kl, kt, kg = jax.random.split(jax.random.key(3), 3)
  logits_BxTxV = 3 * jax.random.normal(kl, (2, 5, 11))
  targets_BxT = jax.random.randint(kt, (2, 5), 0, 11)
  g_BxT = jax.random.normal(kg, (2, 5))
  # Cross-entropy against the smoothed distribution: (1 - e) one-hot + e / V.
  q_BxTxV = (1 - smoothing) * jax.nn.one_hot(targets_BxT, 11) + smoothing / 11
  plain = lambda logits: -(q_BxTxV * jax.nn.log_softmax(logits)).sum(-1)
  got = losses.cross_entropy(logits_BxTxV, targets_BxT, smoothing)
  np.testing.assert_allclose(got, plain(logits_BxTxV), rtol=1e-6, atol=1e-6)
  got = jax.grad(lambda l: jnp.sum(losses.cross_entropy(l, targets_BxT, smoothing) * g_BxT))(logits_BxTxV)
  want = jax.grad(lambda l: jnp.sum(plain(l) * g_BxT))(logits_BxTxV)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_label_smoothing_changes_the_loss_not_the_reported_nll(tiny_config):
  tiny_config.loss.multiple_targets = 2
  results = {}
  for smoothing in (0.0, 0.2):
    tiny_config.loss.label_smoothing = smoothing
    task = train.make_task(tiny_config, 256)
    state = jax.jit(functools.partial(train.init_state, task, seq_len=16))(jax.random.key(0))
    windows_BxS = jax.random.randint(jax.random.key(1), (2, 18), 0, 256)
    results[smoothing] = jax.jit(lambda p: _loss(task, p, windows_BxS))(state.params)
  (loss0, nll0), (loss2, nll2) = results[0.0], results[0.2]
  np.testing.assert_allclose(nll2, nll0, rtol=1e-6)  # The reported likelihood is the plain one.
  weights_LxK = losses.loss_weights(jnp.zeros((), jnp.int32), task.loss_cfg)
  np.testing.assert_allclose(loss0, (weights_LxK * nll0).sum(), rtol=1e-6)
  assert abs(float(loss2) - float(loss0)) > 1e-3  # The minimized loss is the smoothed one.



def test_layer_reduction_mean_divides_by_the_layers_still_on(tiny_config):
  tiny_config.model.num_layers, tiny_config.train.num_steps = 4, 80
  windows_BxS = jax.random.randint(jax.random.key(1), (2, 18), 0, 256)
  totals = {}
  for reduction in ("sum", "mean"):
    tiny_config.loss.layer_reduction = reduction
    task = train.make_task(tiny_config, 256)
    params = jax.jit(functools.partial(train.init_state, task, seq_len=16))(jax.random.key(0)).params
    loss = jax.jit(lambda p, w: losses.compute_loss(task.model, task.loss_cfg, p, windows_BxS, w, None))
    for step in (0, 15, 40):  # Layers 1..3 stop at steps 10, 20 and 30: 4, 3 and 1 layers on.
      weights_LxK = losses.loss_weights(jnp.asarray(step, jnp.int32), task.loss_cfg)
      totals[reduction, step], (nll_LxK, _) = loss(params, weights_LxK)
      np.testing.assert_allclose(totals["sum", step], (weights_LxK * nll_LxK).sum(), rtol=1e-6)
  for step, active in ((0, 4), (15, 3), (40, 1)):
    np.testing.assert_allclose(totals["mean", step], totals["sum", step] / active, rtol=1e-6)
  tiny_config.loss.layer_reduction = "average"
  with pytest.raises(UserError, match="config.loss.layer_reduction must be one of sum, mean; got 'average'"):
    losses.LossConfig.from_config(tiny_config)
