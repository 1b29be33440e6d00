"""A small model that trains fast on a CPU: chartx's recipe for time-to-bpc at small scale.

    python -m chartx.main --config=configs/small.py --workdir=/tmp/chartx_small
    python -m benchmarks.time_to_bpc --budget_s=600   # against a plain PyTorch GPT loop

The dims of configs/bench_cpu.py (6 layers, d_model 256, 8 heads, d_ff 1024, context 256,
batch 16) on the top-level modules of Python's standard library (4.7 MB with Python 3.11,
split 90/5/5 in file order), with the AdamW recipe a nanoGPT user brings (peak 1e-3, 100 steps
of warm-up, cosine decay, clipping at 1, weight decay 0.1, b2 0.99), GPT-2's initialization,
rotary positions and the intermediate layers' auxiliary losses (each choice measured:
docs/results.md, "What configs/small.py learns per step").

Hardware: a CPU. Expect, on 2 cores, about 1 s a step, and validation bpc about 2.36 after 300 s
of wall clock under benchmarks/time_to_bpc.py, where a plain PyTorch GPT loop reaches about 3.25
(docs/results.md, "Time to bpc against a plain PyTorch GPT loop").
"""

import sysconfig

from configs import bench_cpu


def get_config():
  config = bench_cpu.get_config()  # Its dims, dropout 0 and unrolled layers.
  config.data.name = "text_files"
  config.data.path = sysconfig.get_paths()["stdlib"] + "/*.py"
  # The intermediate layers' auxiliary losses help most at this scale; predicting 2 characters
  # ahead helps less, and not on top of them (docs/results.md, "What configs/small.py learns").
  config.loss.intermediate_layers = True
  config.loss.multiple_targets = 1
  # GPT-2's initialization (N(0, 0.02), residual projections by 1/sqrt(2 x layers)): lower bpc
  # at 300 steps than LeCun's (docs/results.md).
  config.model.init = "gpt2"
  # Rotary positions on every layer's queries and keys, not a learned table per layer: about 0.8
  # bpc lower at 300 steps (docs/results.md).
  config.model.positions = "rope"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.momentum = 0.9  # adamw's b1.
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.1
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip = 1.0
  config.train.num_steps = 2000
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.eval.stride = 256
  config.eval.max_chars = 65_536
  config.eval.batch_size = 32
  config.sample.prompt = "def "
  config.sample.temperature = 0.8
  return config
