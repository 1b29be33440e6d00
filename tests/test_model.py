"""The model: causality through gradients, scanned == unrolled, the paper's parameter counts."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chartx import losses, train
from chartx.errors import UserError
from chartx.families import fixed, layers, registry
from configs import enwik8_12l, enwik8_64l


def _task(config, vocab_size=256):
  return train.make_task(config, vocab_size)


def _params(task, seq_len, seed=0):
  init = jax.jit(functools.partial(train.init_state, task, seq_len=seq_len))
  return flax.linen.unbox(init(jax.random.key(seed)).params)


def test_every_head_is_causal_through_gradients(tiny_config):
  """d logits[t] / d (inputs at positions > t) is exactly zero, for every layer and every target.

  Each layer adds its own positional row to the input of position t', so the gradient with
  respect to pos_embedding[:, t'] is the gradient with respect to that layer's input at t'.
  """
  tiny_config.model.num_layers = 3
  tiny_config.loss.multiple_targets = 3
  seq_len, t = 12, 5
  task = _task(tiny_config)
  params = _params(task, seq_len)
  tokens_1xT = jax.random.randint(jax.random.key(1), (1, seq_len), 0, 256)
  cfg = task.model_cfg

  @jax.jit
  def head_outputs_LxK(params):
    h_LxBxTxD = task.model.clone(deterministic=True).apply({"params": params}, tokens_1xT)
    heads = task.model.apply({"params": params}, method=fixed.Transformer.heads)
    return jnp.stack([jnp.stack([
        heads.layer(layer).logits(cfg, h_LxBxTxD[layer], target)[0, t].sum()
        for target in range(cfg.num_targets)]) for layer in range(cfg.num_layers)])

  grads = jax.jit(jax.jacrev(head_outputs_LxK))(params)
  pos_grad_LxKxLxPxD = np.asarray(grads["layers"]["block"]["pos_embedding"])
  embed_grad = np.asarray(grads["embedding"])
  for layer in range(cfg.num_layers):
    for target in range(cfg.num_targets):
      pos_grad_LxPxD = pos_grad_LxKxLxPxD[layer, target]
      assert np.all(pos_grad_LxPxD[:, t + 1:] == 0.0), (layer, target)
      # The layers up to `layer` see positions <= t, so those gradients are not all zero.
      assert np.abs(pos_grad_LxPxD[:layer + 1, :t + 1]).sum() > 0, (layer, target)
      assert np.abs(embed_grad[layer, target]).sum() > 0


def _unstack(params, num_layers):
  """The scanned parameter tree in the unrolled layout (layers_0, layers_1, ...)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for layer in range(num_layers):
    out[f"layers_{layer}"] = jax.tree.map(lambda p: p[layer], params["layers"]["block"])
  return out


def test_scanned_and_unrolled_stacks_give_the_same_loss(tiny_config):
  tiny_config.model.num_layers = 3
  tiny_config.model.remat = "full"  # Remat must not change the numbers either.
  seq_len = 16
  scanned = _task(tiny_config)
  params = _params(scanned, seq_len)
  tiny_config.model.scan_layers = False
  unrolled = _task(tiny_config)
  unrolled_params = _unstack(params, 3)
  # Same tree structure as the unrolled model's own init: the conversion is not hiding a mismatch.
  own = _params(unrolled, seq_len)
  assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, unrolled_params)

  windows_BxS = jax.random.randint(jax.random.key(2), (4, seq_len + 2), 0, 256)
  weights_LxK = losses.loss_weights(jnp.int32(0), scanned.loss_cfg)
  def loss_and_grads(task, params):
    def fn(p):
      loss, (nll_LxK, _) = losses.compute_loss(task.model, task.loss_cfg, p, windows_BxS, weights_LxK, None)
      return loss, nll_LxK
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (loss_s, nll_s), grads_s = loss_and_grads(scanned, params)
  (loss_u, nll_u), grads_u = loss_and_grads(unrolled, unrolled_params)
  np.testing.assert_allclose(nll_s, nll_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  np.testing.assert_allclose(_unstack(grads_s, 3)["layers_1"]["mlp_in"]["kernel"],
                             grads_u["layers_1"]["mlp_in"]["kernel"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config_module,expected_millions", [(enwik8_12l, 44), (enwik8_64l, 235)])
def test_paper_parameter_counts(config_module, expected_millions):
  config = config_module.get_config()
  task = _task(config)
  abstract = jax.eval_shape(functools.partial(train.init_state, task, seq_len=512), jax.random.key(0))
  count = layers.count_params(flax.linen.unbox(abstract.params))
  assert abs(count / 1e6 - expected_millions) < 0.5, count


def test_tied_embeddings_drop_the_next_character_classifiers(tiny_config):
  untied = layers.count_params(_params(_task(tiny_config), 8))
  tiny_config.model.tie_embeddings = True
  tied_task = _task(tiny_config)
  tied = layers.count_params(_params(tied_task, 8))
  cfg = tied_task.model_cfg
  assert untied - tied == cfg.num_layers * (cfg.d_model + 1) * cfg.vocab_size


def test_single_input_position_table(tiny_config):
  tiny_config.model.positions = "input"
  params = _params(_task(tiny_config), 8)
  assert params["pos_embedding"].shape == (tiny_config.model.max_len, tiny_config.model.d_model)
  assert "pos_embedding" not in params["layers"]["block"]


def test_sinusoid_positions_have_no_parameters(tiny_config):
  tiny_config.model.positions = "sinusoid"
  params = _params(_task(tiny_config), 8)
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not [name for name in names if "pos" in name], names
  tiny_config.model.positions = "per_layer"
  learned = layers.count_params(_params(_task(tiny_config), 8))
  cfg = registry.model_config(tiny_config, 256)
  assert learned - layers.count_params(params) == cfg.num_layers * cfg.max_len * cfg.d_model
  # Vaswani et al.'s signal: sin at even columns, cos at odd, wavelengths from 2 pi to 10000 x 2 pi.
  table_PxD = layers.sinusoid_table(50, 8)
  np.testing.assert_allclose(table_PxD[7, 0], np.sin(7.0), rtol=1e-6)
  np.testing.assert_allclose(table_PxD[7, 5], np.cos(7.0 / 10000 ** (4 / 8)), rtol=1e-6)
  tiny_config.model.positions = "learned"
  with pytest.raises(UserError, match="config.model.positions must be one of per_layer, input, sinusoid, rope"):
    registry.model_config(tiny_config, 256)


def test_rotary_scores_depend_on_distance_only():
  q_BxTxNxH, k_BxTxNxH = jax.random.normal(jax.random.key(0), (2, 2, 9, 3, 8))
  def scores(start):
    return jnp.einsum("btnh,bcnh->bntc", layers.rotate(q_BxTxNxH, start), layers.rotate(k_BxTxNxH, start))
  # Shifting every position by the same offset leaves every query-key score as it was; rotations
  # keep norms, and position 0 is not rotated at all.
  np.testing.assert_allclose(scores(37), scores(0), atol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(layers.rotate(q_BxTxNxH, 5), axis=-1),
                             jnp.linalg.norm(q_BxTxNxH, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(layers.rotate(q_BxTxNxH, 0)[:, 0], q_BxTxNxH[:, 0], rtol=1e-6)
  # But the scores do change with position: a query sees a key's distance.
  assert not np.allclose(scores(0), jnp.einsum("btnh,bcnh->bntc", q_BxTxNxH, k_BxTxNxH), atol=1e-2)


def test_rotary_positions_have_no_parameters_and_need_an_even_head_width(tiny_config):
  tiny_config.model.positions = "rope"
  params = _params(_task(tiny_config), 8)
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not [name for name in names if "pos" in name], names
  tiny_config.model.d_model, tiny_config.model.num_heads = 12, 4
  with pytest.raises(UserError, match="config.model.positions=rope needs an even head width .* got 3"):
    registry.model_config(tiny_config, 256)


def test_64_layer_train_step_lowers_and_compiles_on_cpu():
  """configs/enwik8_64l.py: eval_shape of the state, then lower + compile the sharded step."""
  config = enwik8_64l.get_config()
  task = _task(config)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  from chartx import sharding
  rules = sharding.logical_rules(config)
  abstract = jax.eval_shape(functools.partial(train.init_state, task, seq_len=512), jax.random.key(0))
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  abstract_state = flax.linen.unbox(abstract)
  windows = jax.ShapeDtypeStruct((16, 512 + 2), jnp.int32)
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
    lowered = train.jit_train_step(task, mesh, shardings, rules).lower(
        abstract_state, windows, jax.random.key(0), jax.ShapeDtypeStruct((16,), jnp.bool_))
    compiled = lowered.compile()
  assert compiled is not None
  assert "while" in lowered.as_text()  # The 64 layers are one scanned loop, not 64 copies.


def test_flops_per_char_counts_the_real_models_matmul_parameters(tiny_config):
  """6 x the parameters of every matmul that runs + causal attention, from the model's own shapes."""
  tiny_config.model.num_layers, tiny_config.loss.multiple_targets = 3, 3
  task = train.make_task(tiny_config, vocab_size=256)
  seq_len = tiny_config.data.seq_len
  abstract = jax.eval_shape(lambda: train.init_state(task, jax.random.key(0), seq_len))
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract.params), sep="/")
  matmuls = sum(v.size for k, v in flat.items()
                if k.rsplit("/", 1)[-1] in ("query", "key", "value", "attention_out")
                or k.endswith(("mlp_in/kernel", "mlp_out/kernel")))
  heads = flat["head_kernel"].size  # layers x targets x d_model x vocab
  cfg = task.model_cfg
  attention = 6 * cfg.num_layers * seq_len * cfg.d_model
  assert cfg.flops_per_char(seq_len) == 6 * matmuls + attention + 6 * heads
  assert cfg.flops_per_char(seq_len, intermediate_layers=False) == \
      6 * matmuls + attention + 6 * heads // cfg.num_layers


def test_auto_dtype_and_attention_are_the_cpus_on_a_cpu(tiny_config):
  tiny_config.model.dtype = tiny_config.model.attention = "auto"
  cfg = registry.model_config(tiny_config, 256)
  assert (cfg.dtype, cfg.attention) == (("float32", "xla") if jax.default_backend() == "cpu"
                                        else ("bfloat16", cfg.attention))


def test_gpt2_init_and_gelu(tiny_config):
  """init=gpt2: N(0, 0.02) projections, the residual ones divided by sqrt(2 x layers); gelu runs."""
  tiny_config.model.update(num_layers=8, d_model=64, d_ff=256, num_heads=4, init="gpt2", activation="gelu")
  task = _task(tiny_config)
  params = _params(task, 16)
  block = params["layers"]["block"]
  np.testing.assert_allclose(np.std(block["query"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(block["mlp_in"]["kernel"]), 0.02, rtol=0.05)
  for name in ("attention_out", "mlp_out"):
    kernel = block[name]["kernel"] if name == "mlp_out" else block[name]
    np.testing.assert_allclose(np.std(kernel), 0.02 / 4, rtol=0.05, err_msg=name)
  np.testing.assert_allclose(np.std(params["embedding"]), 0.02, rtol=0.05)
  tokens_1xT = jnp.arange(16)[None]
  tiny_config.model.activation = "relu"
  logits = {name: t.model.clone(deterministic=True, all_layers=False).apply(
      {"params": params}, tokens_1xT, method=fixed.Transformer.logits)
            for name, t in (("gelu", task), ("relu", _task(tiny_config)))}
  assert np.all(np.isfinite(logits["gelu"])) and logits["gelu"].shape == (1, 16, 256)
  assert not np.allclose(logits["gelu"], logits["relu"])  # The activation is the one configured.
