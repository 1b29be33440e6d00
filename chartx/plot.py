"""python -m chartx.plot: runs chartx/tools/plot.py (the tools live outside the core library)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("chartx.tools.plot", run_name="__main__", alter_sys=True)
