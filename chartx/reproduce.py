"""python -m chartx.reproduce: runs chartx/tools/reproduce.py (the tools live outside the core library)."""
import runpy

if __name__ == "__main__":
  runpy.run_module("chartx.tools.reproduce", run_name="__main__", alter_sys=True)
