"""Shared fixtures. Tests run from the repository root, so `configs` imports as a package."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compile time, not run time, is most of the suite's time (tiny models), so the suite and the
# processes it starts compile without LLVM's optimizations and share one persistent compilation
# cache: many tests compile the same programs in processes of their own.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # Set here once; pytest-xdist's workers inherit it.
  import atexit  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="chartx_tests_jax_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402


@pytest.fixture
def tiny_config():
  """A fresh, unlocked copy of configs/tiny.py for a test to override."""
  return tiny.get_config()


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """(workdir, overrides): configs/tiny.py trained 20 steps through chartx.main on a fixed text.

  The text is generated, not the repository's sources, so that it cannot change while tests run;
  pass the same overrides to --mode=eval/sample. Checkpoints at steps 10 and 20; validation at 20.
  """
  return _train_tiny(tmp_path_factory.mktemp("trained"), [])


# configs/tiny.py as a Transformer-XL: a memory of 16 in training, evaluated with 24 in segments of 16.
XL_OVERRIDES = ["--config.model.family=xl", "--config.model.mem_len=16",
                "--config.eval.seq_len=16", "--config.eval.mem_len=24"]


@pytest.fixture(scope="session")
def trained_xl_workdir(tmp_path_factory):
  """(workdir, overrides): as trained_workdir, a Transformer-XL (XL_OVERRIDES, which are among the
  overrides): trained on streams, validated recurrently."""
  return _train_tiny(tmp_path_factory.mktemp("trained_xl"), XL_OVERRIDES)


def _train_tiny(root, extra):
  import subprocess  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  words = ("the of and to in is was for that on with as by at from his an are which "
           "character model layer attention window context predict").split()
  text = " ".join(np.random.default_rng(0).choice(words, size=6000)) + "\n"
  (root / "text.txt").write_text(text)
  overrides = [f"--config.data.path={root / 'text.txt'}", *extra]
  workdir = str(root / "workdir")
  proc = subprocess.run([sys.executable, "-m", "chartx.main", "--config=configs/tiny.py",
                         f"--workdir={workdir}", *overrides, "--config.train.num_steps=20",
                         "--config.train.checkpoint_every=10", "--config.train.eval_every=20",
                         "--config.train.log_every=10"], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  return workdir, overrides
