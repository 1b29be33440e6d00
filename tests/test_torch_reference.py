"""The PyTorch reference: the spec's parameter count, a sane start, learning, and agreement with chartx."""

import functools
import math

import pytest

torch = pytest.importorskip("torch")

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from chartx import losses, train  # noqa: E402
from chartx.families import layers  # noqa: E402
from chartx.tools import torch_reference  # noqa: E402

DIMS = dict(vocab_size=40, num_layers=3, d_model=16, num_heads=2, d_ff=24, max_len=12)


def spec_param_count(vocab_size, num_layers, d_model, d_ff, max_len, num_targets, per_layer_positions,
                     tie_embeddings, **_):
  """The count model_spec.md implies: embedding, per-layer blocks and positions, per-layer heads."""
  V, L, D, F, P, K = vocab_size, num_layers, d_model, d_ff, max_len, num_targets
  block = 4 * D * D + 2 * D * F + 2 * 2 * D  # q, k, v, o; feed-forward; two LayerNorms.
  heads = 2 * D + (K - 1 if tie_embeddings else K) * (D * V + V)  # Head norm; classifiers.
  positions = L * P * D if per_layer_positions else P * D
  return V * D + positions + L * (block + heads)


@pytest.mark.parametrize("num_targets,per_layer_positions,tie_embeddings",
                         [(2, True, False), (1, False, False), (3, True, True)])
def test_param_count_matches_spec_and_chartx(tiny_config, num_targets, per_layer_positions, tie_embeddings):
  model = torch_reference.Transformer(**DIMS, num_targets=num_targets,
                                      per_layer_positions=per_layer_positions,
                                      tie_embeddings=tie_embeddings)
  expected = spec_param_count(**DIMS, num_targets=num_targets, per_layer_positions=per_layer_positions,
                              tie_embeddings=tie_embeddings)
  assert torch_reference.count_params(model) == expected
  config = _chartx_config(tiny_config, num_targets=num_targets)
  config.model.positions = "per_layer" if per_layer_positions else "input"
  config.model.tie_embeddings = tie_embeddings
  task = train.make_task(config, DIMS["vocab_size"])
  abstract = jax.eval_shape(lambda r: train.init_state(task, r, DIMS["max_len"]), jax.random.key(0))
  assert layers.count_params(flax.linen.unbox(abstract.params)) == expected


def test_initial_loss_near_log_vocab_and_steps_lower_it():
  step = torch_reference.make_torch_step(**DIMS, num_targets=2, num_steps=100, learning_rate=0.01,
                                         num_threads=1)
  windows_BxS = np.random.default_rng(0).integers(0, DIMS["vocab_size"], (4, DIMS["max_len"] + 2))
  first = step(windows_BxS)
  # Every layer and both targets count at step 0: weight 1 + 0.5 per layer.
  total_weight = DIMS["num_layers"] * 1.5
  # Unit-variance logits at init add about 1/2 nat to ln V.
  assert abs(first / total_weight - math.log(DIMS["vocab_size"])) < 1.0
  for _ in range(8):
    last = step(windows_BxS)
  assert last < first - 1.0


def test_loss_weights_match_chartx():
  for intermediate in (True, False):
    cfg = losses.LossConfig(num_layers=4, num_steps=80, intermediate_layers=intermediate, num_targets=3)
    for step in (0, 9, 10, 19, 20, 29, 30, 79):
      expected = np.asarray(losses.loss_weights(np.int32(step), cfg))
      got = torch_reference.loss_weights(step, num_layers=4, num_steps=80, num_targets=3,
                                         intermediate_layers=intermediate).numpy()
      np.testing.assert_array_equal(got, expected, err_msg=f"step {step}")


@pytest.mark.parametrize("intermediate_layers,multiple_positions,tie_embeddings",
                         [(True, True, False), (False, False, True)])
def test_same_losses_and_update_as_chartx(tiny_config, intermediate_layers, multiple_positions,
                                          tie_embeddings):
  """From the same parameters, both give the same nll_LxK, and the same loss after one update."""
  config = _chartx_config(tiny_config, num_targets=2)
  config.loss.intermediate_layers, config.loss.multiple_positions = intermediate_layers, multiple_positions
  config.model.tie_embeddings = tie_embeddings
  config.optimizer.learning_rate, config.optimizer.momentum = 0.05, 0.99
  task = train.make_task(config, DIMS["vocab_size"])
  init = jax.jit(lambda rng: train.init_state(task, rng, DIMS["max_len"]))
  state = flax.linen.unbox(init(jax.random.key(1)))
  windows_BxS = np.random.default_rng(1).integers(0, DIMS["vocab_size"], (3, DIMS["max_len"] + 2),
                                                  dtype=np.int32)

  step = torch_reference.make_torch_step(**DIMS, num_targets=2, num_steps=config.train.num_steps,
                                         intermediate_layers=intermediate_layers,
                                         multiple_positions=multiple_positions,
                                         tie_embeddings=tie_embeddings, learning_rate=0.05,
                                         momentum=0.99, num_threads=1)
  torch_reference.load_flax_params(step.model, state.params)
  with torch.no_grad():
    logits = step.model(torch.from_numpy(windows_BxS[:, :-2]).long(), all_layers=intermediate_layers)
    torch_nll = torch_reference.nll_LxK(logits, torch.from_numpy(windows_BxS).long(),
                                        multiple_positions).numpy()
  jax_step = jax.jit(functools.partial(train.train_step, task))
  losses_jax, losses_torch = [], []
  for i in range(2):
    state, out = jax_step(state, windows_BxS, jax.random.key(0))
    if i == 0:  # out["nll"] is of the parameters before the update.
      np.testing.assert_allclose(torch_nll, np.asarray(out["nll"]), rtol=1e-4, atol=1e-5)
    losses_jax.append(float(out["loss"]))
    losses_torch.append(step(windows_BxS))
  np.testing.assert_allclose(losses_torch, losses_jax, rtol=1e-4)
  assert losses_jax[1] != losses_jax[0]  # The update did move the parameters.


def _chartx_config(config, num_targets):
  config.model.num_layers, config.model.d_model = DIMS["num_layers"], DIMS["d_model"]
  config.model.num_heads, config.model.d_ff = DIMS["num_heads"], DIMS["d_ff"]
  config.model.max_len = config.data.seq_len = DIMS["max_len"]
  config.loss.multiple_targets = num_targets
  return config
