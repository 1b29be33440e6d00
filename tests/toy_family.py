"""A third model family, registered from tests/ alone (tests/test_family_seam.py): "toy", one layer
that sees the current character and the one before it, h = x_t + tanh(x_{t-1} W), with the
classifiers every family shares (layers.Heads). It keeps base.Family's defaults (no train state,
windows at random positions, sliding-window evaluation) and decodes recurrently, its state the
previous character's embedding. Importing this module registers it (as a plugin would)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from chartx.errors import UserError
from chartx.families import base, layers, registry


class OneLayer(nn.Module):
  """tokens_BxT -> h_BxTxD (h_1xBxTxD with all_layers), the attributes every family's module has."""
  cfg: layers.ModelConfig
  deterministic: bool = True
  all_layers: bool = False

  def setup(self):
    cfg = self.cfg
    self.embedding = layers.embedding_param(self, cfg)
    self.mix = self.param("mix", layers.with_axes(nn.initializers.lecun_normal(), "embed", "mlp"),
                          (cfg.d_model, cfg.d_model))
    self.classifiers = layers.head_params(self, cfg, self.embedding)

  def __call__(self, tokens_BxT: jax.Array, prev_BxD: jax.Array | None = None) -> jax.Array:
    h_BxTxD, _ = self.step(tokens_BxT, prev_BxD)
    return h_BxTxD[None] if self.all_layers else h_BxTxD

  def step(self, tokens_BxT: jax.Array, prev_BxD: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(h_BxTxD, the last character's embedding): prev_BxD is the embedding of the character before
    tokens_BxT (None: nothing before, as zeros)."""
    x_BxTxD = layers.embed(self.cfg, self.embedding, tokens_BxT)
    if prev_BxD is None:
      prev_BxD = jnp.zeros_like(x_BxTxD[:, 0])
    before_BxTxD = jnp.concatenate([prev_BxD[:, None].astype(x_BxTxD.dtype), x_BxTxD[:, :-1]], axis=1)
    return x_BxTxD + jnp.tanh(before_BxTxD @ self.mix.astype(x_BxTxD.dtype)), x_BxTxD[:, -1]

  def heads(self) -> layers.Heads:
    return self.classifiers

  def logits(self, tokens_BxT: jax.Array) -> jax.Array:
    return layers.last_layer_logits(self, self(tokens_BxT))

  def decode(self, tokens_BxT: jax.Array, prev_BxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    h_BxTxD, prev_BxD = self.step(tokens_BxT, prev_BxD)
    return self.heads().layer(-1).logits(self.cfg, h_BxTxD, target=0), prev_BxD


class ToyFamily(base.Family):
  name = "toy"

  def check_config(self, config):
    m = config.model
    if m.num_layers != 1:
      raise UserError(f"config.model.num_layers={m.num_layers}: config.model.family=toy has one layer")

  def build(self, cfg, deterministic=True, all_layers=False):
    return OneLayer(cfg, deterministic=deterministic, all_layers=all_layers)

  def decoder(self, module, context):
    def step(variables, tokens_BxT, prev_BxD, index):
      del index  # It sees one character back, wherever it is.
      return module.apply(variables, tokens_BxT, prev_BxD, method="decode")
    return base.Decoder(step=step, recurrent=True,
                        init_state=lambda _, batch_size: jnp.zeros((batch_size, module.cfg.d_model),
                                                                   module.cfg.compute_dtype))


registry.register(ToyFamily())
