"""The reproduction's full recipe: a deep, narrow model on the Python standard library's sources.

    python -m chartx.reproduce --out=/tmp/chartx_reproduce --seeds=0,1

trains it once per row of the ablation table and seed (chartx/tools/reproduce.py: each row
changes one thing) and scores every row the same way (but the xl row: Transformer-XL, trained for
the full recipe's time and scored on the same characters by its recurrent protocol). 24 layers
of width 64 (2.2M parameters), 4 heads, d_ff 256, context 64, batches of 16: deep, where the
paper's auxiliary losses matter, and small enough that a row trains in minutes on 2 CPU cores.
The data are the top-level modules of the standard library (4.7 MB with Python 3.11), split
90/5/5 in file order, as configs/small.py reads them. Dropout is 0: no run sees even one epoch of
them.

The paper's model and losses (a learned positional table per layer, the three auxiliary losses,
their losses summed), with one difference: Adam with 30 steps of warm-up and the gradient norm
clipped to 1, not the paper's momentum 0.99 at lr 0.003, which does not train in a few hundred
steps here (docs/results.md, "The paper's optimizer at small scale"). The table's "momentum" row
trains the published optimizer against it.

Hardware: a CPU. Expect, for 300 steps on 2 cores, a few minutes a run and a validation bpc of
about 3.5 for the full recipe at stride 1 (docs/results.md, "Reproducing the paper at small
scale", has the whole table).
"""

import sysconfig

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "text_files"
  config.data.path = sysconfig.get_paths()["stdlib"] + "/*.py"
  config.data.seq_len = 64
  config.model.num_layers = 24
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.d_ff = 256
  config.model.max_len = 64
  config.model.dropout = 0.0
  config.optimizer.name = "adamw"  # Not the paper's momentum: see above.
  config.optimizer.learning_rate = 0.003
  config.optimizer.momentum = 0.9  # adamw's b1.
  config.optimizer.warmup_steps = 30
  config.optimizer.grad_clip = 1.0
  config.train.batch_size = 16
  config.train.num_steps = 300
  config.train.log_every = 10
  config.train.checkpoint_every = 0  # chartx.reproduce saves the last step, which it scores.
  # The curves' validation points (chartx.reproduce scores the table at stride 1 separately).
  config.eval.stride = 32
  config.eval.max_chars = 8192
  config.eval.batch_size = 64
  return config
