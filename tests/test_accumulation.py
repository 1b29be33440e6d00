"""train.grad_accum_steps: A micro-batches of B / A rows make the update of one batch of B rows,
and steps, the learning rate and the auxiliary-loss schedule count updates, not micro-batches."""

import functools

import flax
import jax
import numpy as np
import pytest

from chartx import config as config_lib
from chartx import data, losses, train
from chartx.errors import UserError

TEXT_M = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 20, np.uint8)


def _steps(config, num_steps):
  """(initial state, states, outs) of num_steps train steps of config: the same initial state and
  batches for any grad_accum_steps."""
  task = train.make_task(config, 256)
  seq_len = config.data.seq_len
  state = flax.linen.unbox(jax.jit(functools.partial(train.init_state, task, seq_len=seq_len))(
      jax.random.key(0)))
  step_fn = jax.jit(functools.partial(train.train_step, task))
  initial, states, outs = state, [], []
  for step in range(num_steps):
    windows = data.train_batch(TEXT_M, seed=0, step=step, batch_size=config.train.batch_size,
                               length=seq_len + task.model_cfg.num_targets)
    state, out = step_fn(state, windows, jax.random.key(1))
    states.append(state)
    outs.append(out)
  return initial, states, outs


def test_accumulated_micro_batches_make_the_update_of_one_batch_and_count_as_one_step(tiny_config):
  # Momentum SGD (tiny's): the update is the gradient, scaled. 2 layers over 4 steps: layer 1's
  # losses stop at step 1/(2 * 2) * 4 = 1.
  tiny_config.train.num_steps = 4
  assert tiny_config.model.dropout == 0  # Dropout would draw other masks per micro-batch.
  initial, (one,), (one_out,) = _steps(tiny_config, 1)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one.params,
                                       initial.params))
  assert min(moved) > 1e-4  # Every parameter moved: the equalities below are not vacuous.
  tiny_config.train.grad_accum_steps = 4
  _, states, outs = _steps(tiny_config, 2)
  for key in ("loss", "bpc", "grad_norm", "nll"):
    np.testing.assert_allclose(outs[0][key], one_out[key], rtol=1e-5, err_msg=key)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               states[0].params, one.params)
  # The step and the aux-loss schedule count updates: one per 4 micro-batches.
  cfg = losses.LossConfig.from_config(tiny_config)
  assert [int(s.step) for s in states] == [1, 2]
  np.testing.assert_array_equal(outs[0]["loss_weights"], losses.loss_weights(np.int32(0), cfg))
  np.testing.assert_array_equal(states[0].loss_weights, losses.loss_weights(np.int32(1), cfg))
  assert float(outs[0]["loss_weights"][0, 0]) == 1 and float(states[0].loss_weights[0, 0]) == 0


@pytest.mark.parametrize("accum,message", [
    (0, "config.train.grad_accum_steps must be >= 1, got 0"),
    (3, "config.train.grad_accum_steps=3 must divide config.train.batch_size=8"),
])
def test_bad_accumulation_is_a_one_line_error(tiny_config, accum, message):
  tiny_config.train.grad_accum_steps = accum
  with pytest.raises(UserError, match=message):
    config_lib.check(tiny_config)
