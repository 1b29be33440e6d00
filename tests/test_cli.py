"""The console commands pyproject.toml declares: each names a function that exists and behaves
as its python -m form does on --help and on a bad flag. Each runs in its own interpreter, as the
installed script would (absl flags are process-global, and chartx.main and the bench both define
--config)."""

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts() -> dict[str, str]:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


def run_entry(name: str, *args: str) -> subprocess.CompletedProcess:
  """What the installed console script NAME does with ARGS: sys.exit(module.function())."""
  module, function = scripts()[name].split(":")
  code = (f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; "
          f"sys.exit({function}())")
  return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_pyproject_declares_the_commands_and_the_license():
  assert set(scripts()) == {"chartx", "chartx-bench", "chartx-sweep", "chartx-plot", "chartx-reproduce"}
  for target in scripts().values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), target
  with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "Copyright 2026 The chartx authors" in text


@pytest.mark.parametrize("name,expected", [
    ("chartx", "--workdir"), ("chartx-bench", "--compile_only"), ("chartx-sweep", "--grid"),
    ("chartx-plot", "--out"), ("chartx-reproduce", "--seeds")])
def test_command_help_lists_its_flags(name, expected):
  result = run_entry(name, "--help")  # absl's --help exits 1, argparse's 0, as python -m does.
  assert result.returncode == (1 if name in ("chartx", "chartx-bench") else 0), result.stderr
  assert expected in result.stdout, result.stdout


@pytest.mark.parametrize("name,required", [
    ("chartx", []), ("chartx-bench", []),
    ("chartx-sweep", ["--config=configs/tiny.py", "--workdir=/nonexistent"]), ("chartx-plot", ["x"]),
    ("chartx-reproduce", [])])
def test_command_bad_flag_is_an_error_line(name, required):
  result = run_entry(name, "--no_such_flag=1", *required)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert "error" in last and "no_such_flag" in last, result.stderr
