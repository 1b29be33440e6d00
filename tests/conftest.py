"""Shared fixtures. Tests run from the repository root, so `configs` imports as a package."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402


@pytest.fixture
def tiny_config():
  """A fresh, unlocked copy of configs/tiny.py for a test to override."""
  return tiny.get_config()
