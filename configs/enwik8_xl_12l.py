"""Transformer-XL, 12 layers, on enwik8 (Dai et al., ACL 2019): d_model 512, 8 heads of 64,
d_inner 2048, segments of 512 with a memory of 512, about 41M parameters.

    python -m chartx.main --config=configs/enwik8_xl_12l.py --workdir=gs://BUCKET/enwik8_xl_12l
    python -m chartx.main --workdir=gs://BUCKET/enwik8_xl_12l --mode=eval --config.eval.split=test

Expected: the paper reports 1.06 bpc on the enwik8 test set for this model (Table 2, 41M
parameters), evaluated recurrently as eval.* below: segments of 80 characters, a memory of 2,100,
relative distances clamped at 820, every character seeing the same 2,101 (same_length).

The settings are the public scripts' (kimiyoung/transformer-xl: pytorch/run_enwik8_base.sh,
tf/scripts/enwik8_base_gpu.sh); the paper gives the model's size and result, not these. The
scripts disagree on the batch: 22 in the PyTorch script (4 GPUs, 4 rows on the first), 24 in the
TensorFlow one; this config takes the PyTorch script's 22, as the results came from it. On a mesh
whose data-parallel devices do not divide 22, use --config.train.batch_size=24. Both scripts train
with Adam at 2.5e-4, cosine decay over 400k steps without warm-up, gradient clipping at 0.25,
dropout 0.1 and no attention dropout (chartx has none), tied input and output embeddings, and
none of the fixed family's auxiliary losses.

Hardware: one GPU or TPU host (the scripts: 4 GPUs).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "enwik8"
  config.data.seq_len = 512  # Segments of 512 characters (tgt_len).
  config.model.family = "xl"
  config.model.num_layers = 12
  config.model.d_model = 512
  config.model.num_heads = 8  # Heads of 64.
  config.model.d_ff = 2048
  config.model.dropout = 0.1
  config.model.tie_embeddings = True
  config.model.mem_len = 512
  config.loss.intermediate_layers = False  # Transformer-XL trains the last layer's next character only.
  config.loss.multiple_targets = 1
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2.5e-4
  config.optimizer.momentum = 0.9  # Adam's b1.
  config.optimizer.b2 = 0.999
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip = 0.25
  config.train.batch_size = 22
  config.train.num_steps = 400_000
  config.eval.seq_len = 80
  config.eval.mem_len = 2100
  config.eval.clamp_len = 820
  config.eval.same_length = "true"
  config.eval.batch_size = 10  # Streams (the scripts' test batch).
  return config
