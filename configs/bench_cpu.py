"""CPU benchmark: a small model's train step, chartx's timed beside the PyTorch reference.

    pip install -e '.[bench]'   # torch==2.13.0, for --torch only
    python -m chartx.bench --config=configs/bench_cpu.py --torch --steps=20 --out=bench_cpu.jsonl

6 layers, d_model 256, 8 heads, d_ff 1024, context 256, batch 16, float32, 256 symbols (enwik8's
bytes; the bench feeds random windows, no dataset is read). All three auxiliary losses are on, on
both sides alike: every layer's classifiers for 1 and 2 characters ahead run, and the
intermediate-layer schedule (num_steps 2.5M) keeps every layer's loss during the benchmark.
Dropout is 0 on both sides: the two frameworks draw their masks with different generators, whose
cost is not what is being compared.

The layers are unrolled (scan_layers False): six layers compile in seconds either way, and on
XLA:CPU the unrolled step needs about 15% less CPU time than the scanned one, whose while loop
keeps XLA from scheduling and fusing across layers. The bench applies chartx.malloc's glibc
settings before JAX starts, as python -m chartx.main does (XLA:CPU's scratch memory, about 1 GB a
step here, then stays in the process instead of being faulted in afresh every step), and the
PyTorch reference runs in the same process under the same settings.

Hardware: any CPU. chartx_over_torch_paired in the JSON line is chartx's throughput over
PyTorch's, one step of each in turn in one process. Expect, on 2 quiet cores, about 1.04 s a step
and chartx_over_torch_paired of about 1.0 to 1.1 (docs/results.md, "Train step speed against the
PyTorch reference").
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "enwik8"
  config.data.seq_len = 256
  config.model.num_layers = 6
  config.model.d_model = 256
  config.model.num_heads = 8
  config.model.d_ff = 1024
  config.model.max_len = 256
  config.model.dropout = 0.0
  config.model.scan_layers = False
  config.train.batch_size = 16
  return config
