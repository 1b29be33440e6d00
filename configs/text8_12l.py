"""T12 on text8: 12 layers, d_model 512, 8 heads, d_ff 2048, context 512, ~44M parameters.

    python -m chartx.main --config=configs/text8_12l.py --workdir=gs://BUCKET/text8_12l
    python -m chartx.main --config=configs/text8_12l.py --workdir=gs://BUCKET/text8_12l \
        --mode=eval --config.eval.split=test --config.eval.stride=1

Hardware: one Cloud TPU v3-8 / v4-8 or one GPU. The paper (Al-Rfou et al., 2019) reports 1.18
bpc on the text8 test set with the stride-1 protocol.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "text8"
  config.sample.prompt = "the "  # text8 has no capitals or punctuation.
  config.model.num_layers = 12
  config.train.num_steps = 2_500_000
  return config
