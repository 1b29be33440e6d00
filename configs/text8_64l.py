"""T64 on text8: 64 layers, d_model 512, 8 heads, d_ff 2048, context 512, ~235M parameters.

    python -m chartx.main --config=configs/text8_64l.py --workdir=gs://BUCKET/text8_64l
    python -m chartx.main --config=configs/text8_64l.py --workdir=gs://BUCKET/text8_64l \
        --mode=eval --config.eval.split=test --config.eval.stride=1

Hardware: a Cloud TPU v3-8 / v4-8 (the paper: 175 hours to its best checkpoint at 2.5M steps
on one TPU v2, about 4M steps in all) or a GPU with bf16. The paper reports 1.13 bpc on the
text8 test set with the stride-1 protocol.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "text8"
  config.sample.prompt = "the "  # text8 has no capitals or punctuation.
  config.model.num_layers = 64
  config.model.remat = "dots"  # 64 layers of activations do not fit without rematerialization.
  config.train.num_steps = 4_000_000
  return config
