"""Tiny: a 2-layer model on a local text file, for tests and smoke runs (seconds on a CPU).

    python -m chartx.main --config=configs/tiny.py --workdir=/tmp/chartx_tiny

Hardware: any CPU. Expect 50 steps in seconds and the bpc to fall (from about 7.8 at step 10 to
about 5.4 at step 50, docs/results.md); the bpc means nothing at this size.
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "text_files"
  # This repository's own text: present wherever chartx is checked out.
  config.data.path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chartx")
  config.data.seq_len = 32
  config.model.num_layers = 2
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.d_ff = 64
  config.model.max_len = 32
  config.model.dropout = 0.0
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.train.batch_size = 8
  config.train.num_steps = 50
  config.train.log_every = 10
  config.train.eval_every = 25
  config.train.checkpoint_every = 25
  config.eval.max_chars = 2048
  config.eval.batch_size = 8
  return config
