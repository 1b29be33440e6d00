"""A plain PyTorch GPT training loop, the recipe users copy from nanoGPT: the time-to-bpc baseline.

Written here for benchmarks/time_to_bpc.py, not copied: a GPT-2 block (pre-LayerNorm, GELU,
learned absolute positions, a head tied to the input embedding, N(0, 0.02) weights with the
residual projections divided by sqrt(2 x layers)), AdamW (betas 0.9/0.99, weight decay on
matrices only), linear warm-up then cosine decay to a tenth, gradient clipping at 1, batches of
random windows of the training bytes. Eager mode, float32, on the CPU.

    python -m benchmarks.torch_gpt --data=FILE --budget_s=600 --num_steps=300 --out=result.json [--threads=2]
"""

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chartx.data import text_files
from chartx.scoring import window_starts


class Block(nn.Module):
  def __init__(self, d_model: int, num_heads: int, d_ff: int, num_layers: int):
    super().__init__()
    self.num_heads = num_heads
    self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
    self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
    self.proj = nn.Linear(d_model, d_model, bias=False)
    self.fc = nn.Linear(d_model, d_ff, bias=False)
    self.fc_proj = nn.Linear(d_ff, d_model, bias=False)
    for residual in (self.proj, self.fc_proj):
      residual.scale_init = 1 / math.sqrt(2 * num_layers)

  def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
    B, T, D = x_BxTxD.shape
    qkv_3xBxNxTxH = self.qkv(self.ln_1(x_BxTxD)).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    a_BxNxTxH = F.scaled_dot_product_attention(*qkv_3xBxNxTxH, is_causal=True)
    x_BxTxD = x_BxTxD + self.proj(a_BxNxTxH.transpose(1, 2).reshape(B, T, D))
    return x_BxTxD + self.fc_proj(F.gelu(self.fc(self.ln_2(x_BxTxD))))


class GPT(nn.Module):
  def __init__(self, *, vocab_size: int, seq_len: int, num_layers: int, d_model: int, num_heads: int,
               d_ff: int):
    super().__init__()
    self.embedding = nn.Embedding(vocab_size, d_model)
    self.positions = nn.Embedding(seq_len, d_model)
    self.blocks = nn.ModuleList(Block(d_model, num_heads, d_ff, num_layers) for _ in range(num_layers))
    self.ln_f = nn.LayerNorm(d_model)
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02 * getattr(module, "scale_init", 1.0))

  def forward(self, tokens_BxT: torch.Tensor) -> torch.Tensor:
    """logits_BxTxV of the next byte at every position."""
    x_BxTxD = self.embedding(tokens_BxT) + self.positions(torch.arange(tokens_BxT.shape[1]))
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD)
    return self.ln_f(x_BxTxD) @ self.embedding.weight.T  # Tied head.


def learning_rate(step: int, peak: float, warmup: int, num_steps: int) -> float:
  if step < warmup:
    return peak * (step + 1) / warmup
  progress = min((step - warmup) / max(num_steps - warmup, 1), 1.0)
  return peak / 10 + 0.5 * (peak - peak / 10) * (1 + math.cos(math.pi * progress))


def validation_bpc(model: GPT, ids_M: np.ndarray, seq_len: int, stride: int, batch_size: int = 32) -> tuple[float, int]:
  """bpc over ids_M scored exactly as chartx.evaluate scores it (the same windows and targets)."""
  starts_W, first_W = window_starts(len(ids_M), seq_len, stride)
  offsets_S = np.arange(seq_len + 1)
  nats, count = 0.0, 0
  model.eval()
  with torch.no_grad():
    for lo in range(0, len(starts_W), batch_size):
      windows_BxS = torch.from_numpy(ids_M[starts_W[lo:lo + batch_size, None] + offsets_S].astype(np.int64))
      nll_BxT = F.cross_entropy(model(windows_BxS[:, :-1]).transpose(1, 2), windows_BxS[:, 1:], reduction="none")
      mask_BxT = torch.arange(seq_len)[None, :] >= torch.from_numpy(first_W[lo:lo + batch_size, None])
      nats += float(nll_BxT[mask_BxT].sum())
      count += int(mask_BxT.sum())
  model.train()
  return nats / math.log(2) / count, count


def train(args: argparse.Namespace) -> dict:
  torch.manual_seed(args.seed)
  torch.set_num_threads(args.threads)
  train_ids, valid_ids, _ = text_files.load_splits(args.data)
  model = GPT(vocab_size=256, seq_len=args.seq_len, num_layers=args.num_layers, d_model=args.d_model,
              num_heads=args.num_heads, d_ff=args.d_ff)
  matrices = [p for p in model.parameters() if p.dim() >= 2]
  others = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                                 {"params": others, "weight_decay": 0.0}],
                                lr=args.learning_rate, betas=(0.9, 0.99))
  rng = np.random.default_rng(args.seed)
  # The deadline: --deadline_unix (time_to_bpc counts from this process's launch), else
  # --budget_s from here.
  deadline_unix = args.deadline_unix if args.deadline_unix is not None else time.time() + args.budget_s
  start = time.perf_counter()
  step, step_times = 0, []
  while step < args.num_steps and (time.time() < deadline_unix or step == 0):
    t = time.perf_counter()
    for group in optimizer.param_groups:
      group["lr"] = learning_rate(step, args.learning_rate, args.warmup_steps, args.num_steps)
    starts_B = rng.integers(0, len(train_ids) - args.seq_len - 1, size=args.batch_size)
    windows_BxS = torch.from_numpy(train_ids[starts_B[:, None] + np.arange(args.seq_len + 1)].astype(np.int64))
    logits_BxTxV = model(windows_BxS[:, :-1])
    loss = F.cross_entropy(logits_BxTxV.reshape(-1, logits_BxTxV.shape[-1]), windows_BxS[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    step += 1
    step_times.append(time.perf_counter() - t)
    if step % args.log_every == 0:
      print(f"torch_gpt: step {step}  loss {loss.item():.4f}  {np.median(step_times[-args.log_every:]):.3f} s/step",
            file=sys.stderr, flush=True)
  train_s = time.perf_counter() - start
  result = {"steps": step, "train_s": train_s, "train_end_unix": time.time(), "step_time_s": float(np.median(step_times)),
            "params": sum(p.numel() for p in model.parameters()), "torch_version": torch.__version__,
            "threads": torch.get_num_threads()}
  if not args.no_eval:
    result["validation_bpc"], result["validation_chars"] = validation_bpc(model, valid_ids, args.seq_len,
                                                                          args.seq_len)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="the text file (split 90/5/5 as chartx's text_files)")
  budget = parser.add_mutually_exclusive_group(required=True)
  budget.add_argument("--budget_s", type=float, help="wall-clock seconds of training, from its first step")
  budget.add_argument("--deadline_unix", type=float, help="train until this time.time()")
  parser.add_argument("--num_steps", type=int, required=True, help="the cosine schedule's horizon (and the most steps)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--d_ff", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--warmup_steps", type=int, default=100)
  parser.add_argument("--weight_decay", type=float, default=0.1)
  parser.add_argument("--no_eval", action="store_true", help="skip scoring the validation split")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  result = train(args)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
