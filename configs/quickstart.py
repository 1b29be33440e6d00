"""Quickstart: a small model on the sources of Python's email package, offline, on a CPU.

    make demo
    # which runs:
    python -m chartx.main --config=configs/quickstart.py --workdir=/tmp/chartx_quickstart
    python -m chartx.main --config=configs/quickstart.py --workdir=/tmp/chartx_quickstart --mode=sample

Hardware: a CPU. Expect, on 2 cores, about four minutes of training, validation bpc falling to
about 2.1 at step 1,500, then a sample that reads like the email package's Python (docs/results.md,
"make demo and make test").
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
  # Adam, not the paper's momentum: in 1,500 steps on a CPU it gets much further, here and on
  # configs/reproduce.py (docs/results.md: "make demo and make test", "The paper's optimizer").
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
