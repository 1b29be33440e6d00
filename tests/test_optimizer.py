"""adamw's weight decay reaches the projection matrices only."""

import flax
import jax
import numpy as np
import pytest

from chartx import optimizer, train

MATRICES = {"query", "key", "value", "attention_out", "kernel", "head_kernel"}


@pytest.mark.parametrize("overrides,extra", [
    ({}, set()),  # Learned positions, layers scanned.
    ({"positions": "per_layer", "scan_layers": False, "tie_embeddings": False}, set()),
    ({"family": "xl", "mem_len": 4}, {"position_key"}),
])
def test_adamw_decays_the_matrices_and_nothing_else(tiny_config, overrides, extra):
  tiny_config.model.update(overrides)
  tiny_config.optimizer.name = "adamw"
  tiny_config.optimizer.weight_decay = 0.5
  tiny_config.optimizer.warmup_steps = 0
  tiny_config.optimizer.schedule = "constant"
  task = train.make_task(tiny_config, 256)
  params = flax.linen.unbox(jax.jit(lambda r: train.init_state(task, r, 16))(jax.random.key(0)).params)
  # One update with zero gradients: adamw's only change is the decay, -lr x wd x w.
  tx = task.tx
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr_wd = tiny_config.optimizer.learning_rate * tiny_config.optimizer.weight_decay
  changed, unchanged = set(), set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    w = params
    for k in path:
      w = w[k.key]
    name = path[-1].key
    if np.allclose(u, 0.0):
      unchanged.add(name)
    else:
      np.testing.assert_allclose(u, -lr_wd * np.asarray(w), rtol=1e-5, atol=1e-8, err_msg=name)
      changed.add(name)
  assert changed == MATRICES | extra
  assert not unchanged & changed and {"embedding", "scale", "bias"} <= unchanged
  # The boxed tree (as train.init_state makes it) gets the same mask.
  boxed = jax.eval_shape(lambda r: train.init_state(task, r, 16), jax.random.key(0)).params
  assert jax.tree.leaves(optimizer.decayed(boxed)) == jax.tree.leaves(optimizer.decayed(params))
