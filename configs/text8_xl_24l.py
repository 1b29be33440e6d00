"""Transformer-XL, 24 layers, on text8: enwik8_xl_24l's model, training and evaluation, text8's
27 symbols; about 277M parameters.

    python -m chartx.main --config=configs/text8_xl_24l.py --workdir=gs://BUCKET/text8_xl_24l
    python -m chartx.main --workdir=gs://BUCKET/text8_xl_24l --mode=eval --config.eval.split=test

Expected: the paper (Dai et al., ACL 2019) reports 1.08 bpc on the text8 test set for this model
(Table 3, 277M parameters), against the fixed-context T64's 1.13 (configs/text8_64l.py).

The settings are the public scripts' (kimiyoung/transformer-xl: tf/scripts/text8_large_tpu.sh
for training, tf/sota/text8.sh for the test evaluation), the same as for enwik8: segments of 768
with a memory of 768, a global batch of 64, Adam at 2.5e-4 with 4,000 warm-up steps and cosine
decay over 400k steps, clipping at 0.25, dropout 0.15 (and attention dropout 0.15, which chartx
does not have); tested with segments of 128, a memory of 3,800, clamp_len 1,000 and same_length.

Hardware: as configs/enwik8_xl_24l.py.
"""

from configs import enwik8_xl_24l


def get_config():
  config = enwik8_xl_24l.get_config()
  config.data.name = "text8"
  config.sample.prompt = "the "  # text8 has no capitals or punctuation.
  return config
