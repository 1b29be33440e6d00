"""python -m chartx.data.bench: runs chartx/tools/data_bench.py (the tools live outside the core library)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("chartx.tools.data_bench", run_name="__main__", alter_sys=True)
