"""Transformer-XL, 12 layers, on text8: enwik8_xl_12l's model and training, text8's 27 symbols.

    python -m chartx.main --config=configs/text8_xl_12l.py --workdir=gs://BUCKET/text8_xl_12l
    python -m chartx.main --workdir=gs://BUCKET/text8_xl_12l --mode=eval --config.eval.split=test

Expected: no published number. The paper (Dai et al., ACL 2019) reports text8 for 24 layers only
(1.08 bpc, configs/text8_xl_24l.py); the fixed-context T12 reaches 1.18 (configs/text8_12l.py).

The settings are tf/scripts/text8_base_gpu.sh's (kimiyoung/transformer-xl), the same as its
enwik8 base script: segments of 512 with a memory of 512, batch 24, Adam at 2.5e-4, cosine decay
over 400k steps, clipping at 0.25, dropout 0.1; tested with segments of 80, a memory of 2,100,
clamp_len 820 and same_length. The repository's pytorch/run_text8.sh trains another recipe
(segments and memory of 256, batch 16, dropout 0.2, 1M steps); with no paper result for either,
this config follows the TensorFlow script, whose settings match the enwik8 base that the paper
reports.

Hardware: one GPU or TPU host.
"""

from configs import enwik8_xl_12l


def get_config():
  config = enwik8_xl_12l.get_config()
  config.data.name = "text8"
  config.sample.prompt = "the "  # text8 has no capitals or punctuation.
  config.train.batch_size = 24
  return config
