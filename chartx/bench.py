"""python -m chartx.bench: runs chartx/tools/bench.py (the tools live outside the core library)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("chartx.tools.bench", run_name="__main__", alter_sys=True)
