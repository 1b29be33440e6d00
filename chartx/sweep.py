"""python -m chartx.sweep: runs chartx/tools/sweep.py (the tools live outside the core library)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("chartx.tools.sweep", run_name="__main__", alter_sys=True)
