"""Quickstart: a small model on the Python standard library's own sources, offline, on a CPU.

    make demo
    # which runs:
    python -m chartx.main --config=configs/quickstart.py --workdir=/tmp/chartx_quickstart
    python -m chartx.main --config=configs/quickstart.py --workdir=/tmp/chartx_quickstart --mode=sample

Hardware: a 2-core CPU, about four minutes. Measured on 2026-11-29 (2-core AMD EPYC, `make demo`,
the machine otherwise quiet): 3 min 45 s of training, validation bpc 3.42 at step 250, 2.89 at 500,
2.48 at 750, 2.27 at 1000, 2.06 at 1500, then a sample that reads like Python's email package.
"""

import sysconfig

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "text_files"
  # Real text on any machine with Python: the standard library's email package (~380 KB).
  config.data.path = sysconfig.get_paths()["stdlib"] + "/email/*.py"
  config.data.seq_len = 128
  config.model.num_layers = 4
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.d_ff = 512
  config.model.max_len = 128
  config.model.dropout = 0.1
  # Adam, not the paper's momentum: in 1,500 steps on a CPU it gets much further (measured on
  # this config: validation bpc 2.07 against momentum's 3.57 after 1,500 steps). On the 24-layer
  # configs/reproduce.py neither warm-up, clipping, averaged layer losses nor a larger rate made
  # momentum 0.99 train in 300 steps (README.md, "Reproducing the paper").
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 0.003
  config.optimizer.momentum = 0.9  # adamw's b1.
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip = 1.0
  config.train.batch_size = 16
  config.train.num_steps = 1500
  config.train.log_every = 100
  config.train.eval_every = 250
  config.train.checkpoint_every = 500
  config.eval.stride = 64
  config.eval.max_chars = 16_384
  config.eval.batch_size = 32
  config.sample.prompt = "def "
  config.sample.num_chars = 300
  config.sample.temperature = 0.8
  return config
