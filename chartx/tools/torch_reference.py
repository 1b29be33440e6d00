"""The chartx model and train step in PyTorch eager, the baseline of the CPU benchmark.

It follows the model spec that chartx.families and chartx.losses implement: per-layer positional
tables, pre-LayerNorm blocks, per-layer classifiers for K characters ahead, the three auxiliary
losses with the same weights and schedule, and SGD with momentum. Attention is
F.scaled_dot_product_attention(is_causal=True), PyTorch's fused (flash) CPU kernel. Initial
values follow the same distributions as chartx.families.fixed, not the same draws.

Only the benchmark needs it (the `bench` extra installs torch); chartx itself never imports it.
"""

import math
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Flax's lecun_normal truncates a normal at 2 stddevs and rescales it by this factor so that
# the truncated draw has variance 1 / fan_in.
_TRUNCATED_STDDEV = 0.87962566103423978


def _lecun_normal_(weight: torch.Tensor, fan_in: int) -> None:
  std = math.sqrt(1.0 / fan_in) / _TRUNCATED_STDDEV
  nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class Block(nn.Module):
  """One pre-LayerNorm layer: [own positions] -> causal attention -> ReLU feed-forward."""

  def __init__(self, d_model: int, num_heads: int, d_ff: int, max_len: int, dropout: float,
               own_positions: bool):
    super().__init__()
    self.num_heads = num_heads
    self.pos_embedding = nn.Parameter(torch.empty(max_len, d_model)) if own_positions else None
    self.attention_norm = nn.LayerNorm(d_model, eps=1e-6)
    # Query, key and value projections in one matrix (the same parameters as three D x D ones).
    self.qkv = nn.Parameter(torch.empty(d_model, 3 * d_model))
    self.attention_out = nn.Parameter(torch.empty(d_model, d_model))
    self.mlp_norm = nn.LayerNorm(d_model, eps=1e-6)
    self.mlp_in = nn.Parameter(torch.empty(d_model, d_ff))
    self.mlp_out = nn.Parameter(torch.empty(d_ff, d_model))
    self.dropout = nn.Dropout(dropout)
    if own_positions:
      nn.init.normal_(self.pos_embedding, std=0.02)
    for weight in (self.qkv, self.attention_out, self.mlp_in, self.mlp_out):
      _lecun_normal_(weight, weight.shape[0])

  def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
    B, T, D = x_BxTxD.shape
    N = self.num_heads
    if self.pos_embedding is not None:
      x_BxTxD = x_BxTxD + self.pos_embedding[:T]
    h_BxTxD = self.attention_norm(x_BxTxD)
    qkv_3xBxNxTxH = (h_BxTxD @ self.qkv).view(B, T, 3, N, D // N).permute(2, 0, 3, 1, 4)
    a_BxNxTxH = F.scaled_dot_product_attention(*qkv_3xBxNxTxH, is_causal=True)
    a_BxTxD = a_BxNxTxH.transpose(1, 2).reshape(B, T, D)
    x_BxTxD = x_BxTxD + self.dropout(a_BxTxD @ self.attention_out)
    h_BxTxF = F.relu(self.mlp_norm(x_BxTxD) @ self.mlp_in)
    return x_BxTxD + self.dropout(h_BxTxF @ self.mlp_out)


class Transformer(nn.Module):
  """tokens_BxT -> logits_KxLxBxTxV of every layer's classifier for 1..K characters ahead."""

  def __init__(self, *, vocab_size: int, num_layers: int, d_model: int, num_heads: int, d_ff: int,
               max_len: int, dropout: float = 0.0, num_targets: int = 1,
               per_layer_positions: bool = True, tie_embeddings: bool = False):
    super().__init__()
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    self.tie_embeddings = tie_embeddings
    self.embedding = nn.Parameter(torch.randn(vocab_size, d_model))
    self.pos_embedding = (None if per_layer_positions
                          else nn.Parameter(torch.randn(max_len, d_model) * 0.02))
    self.dropout = nn.Dropout(dropout)
    self.layers = nn.ModuleList(Block(d_model, num_heads, d_ff, max_len, dropout, per_layer_positions)
                                for _ in range(num_layers))
    L, D, V = num_layers, d_model, vocab_size
    self.head_norm_scale = nn.Parameter(torch.ones(L, 1, D))
    self.head_norm_bias = nn.Parameter(torch.zeros(L, 1, D))
    # C [K, L, D, V] and c [K, L, V]; tied, the next-character classifier is E^T (no bias).
    num_own = num_targets - 1 if tie_embeddings else num_targets
    self.head_kernel = nn.Parameter(torch.randn(num_own, L, D, V) / math.sqrt(D))
    self.head_bias = nn.Parameter(torch.zeros(num_own, L, 1, V))

  def forward(self, tokens_BxT: torch.Tensor, all_layers: bool = True) -> torch.Tensor:
    """logits_KxLxBxTxV; L is 1 (the last layer's classifiers only) unless all_layers."""
    B, T = tokens_BxT.shape
    x_BxTxD = F.embedding(tokens_BxT, self.embedding)
    if self.pos_embedding is not None:
      x_BxTxD = x_BxTxD + self.pos_embedding[:T]
    x_BxTxD = self.dropout(x_BxTxD)
    outputs = []
    for layer in self.layers:
      x_BxTxD = layer(x_BxTxD)
      outputs.append(x_BxTxD.reshape(B * T, -1))
    if not all_layers:
      outputs = outputs[-1:]
    first = len(self.layers) - len(outputs)  # Index of the first layer that runs its classifiers.
    h_LxMxD = torch.stack(outputs)  # M = B * T rows.
    z_LxMxD = (F.layer_norm(h_LxMxD, h_LxMxD.shape[-1:], eps=1e-6) * self.head_norm_scale[first:]
               + self.head_norm_bias[first:])
    logits_KxLxMxV = torch.matmul(z_LxMxD, self.head_kernel[:, first:]) + self.head_bias[:, first:]
    if self.tie_embeddings:
      tied_1xLxMxV = (z_LxMxD @ self.embedding.T)[None]
      logits_KxLxMxV = torch.cat([tied_1xLxMxV, logits_KxLxMxV])
    return logits_KxLxMxV.view(*logits_KxLxMxV.shape[:2], B, T, -1)


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def load_flax_params(model: Transformer, params: dict) -> None:
  """Copies chartx.families.fixed parameters (unboxed, scanned layers: scan_layers=True) into model.

  Both sides then start from the same point; the test of this module uses it to check the two
  implementations against each other.
  """
  as_tensor = lambda x: torch.from_numpy(np.array(x, np.float32))
  layers = params["layers"]["block"]
  with torch.no_grad():
    model.embedding.copy_(as_tensor(params["embedding"]))
    if model.pos_embedding is not None:
      model.pos_embedding.copy_(as_tensor(params["pos_embedding"]))
    for l, block in enumerate(model.layers):
      layer = lambda name, leaf=None: as_tensor((layers[name] if leaf is None else layers[name][leaf])[l])
      if block.pos_embedding is not None:
        block.pos_embedding.copy_(layer("pos_embedding"))
      D = block.qkv.shape[0]
      block.qkv.copy_(torch.cat([layer(name).reshape(D, D) for name in ("query", "key", "value")], 1))
      block.attention_out.copy_(layer("attention_out").reshape(D, D))
      block.mlp_in.copy_(layer("mlp_in", "kernel"))
      block.mlp_out.copy_(layer("mlp_out", "kernel"))
      for norm, name in ((block.attention_norm, "attention_norm"), (block.mlp_norm, "mlp_norm")):
        norm.weight.copy_(layer(name, "scale"))
        norm.bias.copy_(layer(name, "bias"))
    model.head_norm_scale.copy_(as_tensor(params["head_norm_scale"])[:, None])
    model.head_norm_bias.copy_(as_tensor(params["head_norm_bias"])[:, None])
    if model.head_kernel.shape[0]:
      model.head_kernel.copy_(as_tensor(params["head_kernel"]).transpose(0, 1))
      model.head_bias.copy_(as_tensor(params["head_bias"]).transpose(0, 1)[:, :, None])



def nll_LxK(logits_KxLxBxTxV: torch.Tensor, windows_BxS: torch.Tensor,
            multiple_positions: bool = True) -> torch.Tensor:
  """Mean cross-entropy (nats) of every layer's classifier for k ahead, against windows[:, k:T+k]."""
  K, L, B, T, V = logits_KxLxBxTxV.shape
  targets_KxBxT = torch.stack([windows_BxS[:, k + 1:k + 1 + T] for k in range(K)])
  targets_KxLxBxT = targets_KxBxT[:, None].expand(K, L, B, T)
  if not multiple_positions:  # Ablation of aux loss 1: only the last position of each window.
    logits_KxLxBxTxV, targets_KxLxBxT = logits_KxLxBxTxV[..., -1:, :], targets_KxLxBxT[..., -1:]
  nll = F.cross_entropy(logits_KxLxBxTxV.reshape(-1, V), targets_KxLxBxT.reshape(-1), reduction="none")
  return nll.view(K, L, -1).mean(-1).T


def loss_weights(step: int, *, num_layers: int, num_steps: int, num_targets: int,
                 intermediate_layers: bool = True, aux_target_weight: float = 0.5) -> torch.Tensor:
  """w_LxK: layer l < L counts while step < l / (2L) * num_steps; targets k >= 2 weigh aux_target_weight."""
  stops = [-(-layer * num_steps // (2 * num_layers)) if intermediate_layers else 0
           for layer in range(1, num_layers)]
  active_L = torch.tensor([float(step < stop) for stop in stops] + [1.0])
  target_K = torch.tensor([1.0] + [aux_target_weight] * (num_targets - 1))
  return active_L[:, None] * target_K[None, :]


def make_torch_step(*, vocab_size: int, num_layers: int, d_model: int, num_heads: int, d_ff: int,
                    max_len: int, dropout: float = 0.0, num_targets: int = 2,
                    per_layer_positions: bool = True, tie_embeddings: bool = False,
                    multiple_positions: bool = True, intermediate_layers: bool = True,
                    aux_target_weight: float = 0.5, num_steps: int = 2_500_000,
                    learning_rate: float = 0.003, momentum: float = 0.99, seed: int = 0,
                    num_threads: int | None = None) -> Callable[[np.ndarray], float]:
  """A stateful train step: step(windows_BxS) does one SGD-momentum update and returns the loss.

  windows_BxS holds S = T + num_targets characters (inputs w[:, :T], targets w[:, k:T+k]). The
  intermediate-layer schedule follows the step count, as in chartx.train. Sets PyTorch's intra-op
  threads to num_threads (default: the CPUs this process may run on). step.model is the module.
  """
  torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
  torch.manual_seed(seed)
  model = Transformer(vocab_size=vocab_size, num_layers=num_layers, d_model=d_model,
                      num_heads=num_heads, d_ff=d_ff, max_len=max_len, dropout=dropout,
                      num_targets=num_targets, per_layer_positions=per_layer_positions,
                      tie_embeddings=tie_embeddings)
  model.train()
  # Same update as optax.sgd(lr, momentum): m = momentum * m + g; p -= lr * m.
  optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
  weights = lambda step: loss_weights(step, num_layers=num_layers, num_steps=num_steps,
                                      num_targets=num_targets, intermediate_layers=intermediate_layers,
                                      aux_target_weight=aux_target_weight)
  state = {"step": 0}

  def step(windows_BxS: np.ndarray) -> float:
    windows = torch.from_numpy(np.asarray(windows_BxS, np.int64))
    # Without intermediate layers only the last layer runs its classifiers, as in chartx.train.
    logits = model(windows[:, :windows.shape[1] - num_targets], all_layers=intermediate_layers)
    nll = nll_LxK(logits, windows, multiple_positions)
    loss = (weights(state["step"])[-nll.shape[0]:] * nll).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    state["step"] += 1
    return float(loss.detach())

  step.model = model
  return step
