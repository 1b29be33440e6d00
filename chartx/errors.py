"""What a user sees of a failure: UserError, one line per bad flag, no TensorStore tracebacks."""

import re
import sys
from typing import Any

from absl import flags


class UserError(Exception):
  """A bad config key, file, flag or checkpoint; the message names the culprit."""


def parse_flags(argv: list[str], config: flags.FlagHolder) -> list[str]:
  """absl's parser for app.run: a bad flag, config file or --config override prints one line, exit 1."""
  try:
    argv = flags.FLAGS(argv)
    if config.value is not None:  # None: no --config (main says whether it needs one).
      config.value.get("seed")  # config_flags defers a config file's load error to first use.
    return argv
  except Exception as e:  # absl and config_flags raise many types; all mean a bad command line.
    print(f"error: {_unknown_key(argv, e) or ' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def adopt_main_module(module_name: str, doc: str | None) -> None:
  """For a console command (pyproject.toml), whose __main__ is pip's wrapper script: --help shows
  the usage and flags of module_name, as `python -m module_name --help` does (absl lists the key
  flags of the module named by sys.argv[0], and __main__'s docstring)."""
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  sys.modules["__main__"].__doc__ = doc


def _unknown_key(argv: list[str], e: Exception) -> str | None:
  """An unknown key in plain words: '--config.model.nlayers: no such config key; did you mean
  num_layers?' from config_flags' KeyError("'nlayers'\nDid you mean \"num_layers\" ...")."""
  while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(...)).
    e = e.args[0]
  if isinstance(e, flags.Error) or not e.args:
    return None
  missing, _, hint = str(e.args[0]).partition("\n")
  missing = missing.strip("\"' ")
  for arg in argv[1:]:
    key = arg.split("=", 1)[0]
    if key.startswith("--config.") and missing in key[len("--config."):].split("."):
      suggestion = re.search(r'Did you mean "([^"]+)"', hint)
      return f"{key}: no such config key" + (f"; did you mean {suggestion[1]}?" if suggestion else "")
  return None


def drop_closed_loop_reports() -> None:
  """Once per process (chartx.checkpoint calls it before reading): when a read fails, TensorStore
  finishes the other reads Orbax started and reports each, late and from any thread, to the asyncio
  loop Orbax has closed; Python would print a traceback for every one after the one-line error."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook
