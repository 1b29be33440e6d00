"""CPU benchmark: the issue's dims, chartx's train step timed beside the PyTorch reference.

    pip install -e '.[bench]'   # torch==2.13.0, for --torch only
    export GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
    python -m chartx.bench --config=configs/bench_cpu.py --torch --steps=20 --out=bench_cpu.jsonl

6 layers, d_model 256, 8 heads, d_ff 1024, context 256, batch 16, float32, 256 symbols (enwik8's
bytes; the bench feeds random windows, no dataset is read). All three auxiliary losses are on, on
both sides alike: every layer's classifiers for 1 and 2 characters ahead run, and the
intermediate-layer schedule (num_steps 2.5M) keeps every layer's loss during the benchmark.
Dropout is 0 on both sides: the two frameworks draw their masks with different generators, whose
cost is not what is being compared.

The layers are unrolled (scan_layers False): six layers compile in seconds either way, and on
XLA:CPU the unrolled step needs about 15% less CPU time than the scanned one, whose while loop
keeps XLA from scheduling and fusing across layers. GLIBC_TUNABLES (optional, both sides run
under it) keeps freed memory in the process: XLA:CPU allocates each step's scratch buffer (0.87
GB here) afresh, and glibc otherwise maps it from the kernel every step, page by page (0.3 s of
system time a step on a 2-core machine).

Hardware: any CPU. chartx_over_torch in the JSON line is chartx's throughput over PyTorch's,
measured one step of each in turn in one process. Expect, on 2 cores of an AMD EPYC (AVX-512)
with jax 0.10.2 and torch 2.13.0: about 0.86 s a step for chartx and 1.09 s for PyTorch
(chartx_over_torch 1.26); with GLIBC_TUNABLES, 0.68 s and 0.94 s (1.39).
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
