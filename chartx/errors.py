"""What a user sees of a failure: UserError, one line per bad flag, no TensorStore tracebacks.

Every entry point (chartx.main and the tools) runs under one_line_errors(): a UserError prints
`error: ...` on stderr and exits 1; CHARTX_DEBUG=1 in the environment adds the traceback.
"""

import contextlib
import errno
import logging as std_logging
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, Iterator

from absl import flags


# Set (to anything but 0 or empty) to see the traceback behind an `error: ...` line.
DEBUG_ENV = "CHARTX_DEBUG"


class UserError(Exception):
  """A bad config key, file, flag or checkpoint; the message names the culprit."""


class WriteFailed(UserError):
  """A run's output could not be written (a full disk, a lost mount, a quota): the message names
  the file and the cause; the training loop adds the newest complete checkpoint (checkpoint_note)."""

  def __init__(self, message: str, checkpoint_note: bool = False):
    super().__init__(message)
    self.checkpoint_note = checkpoint_note


def debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def cause(e: BaseException) -> str:
  """What went wrong, in a few words: 'no space left on device' from an OSError, or from the
  [os_error_code='28'] TensorStore puts in the ValueError Orbax raises; else the first line."""
  code = getattr(e, "errno", None)
  if code is None:
    found = re.search(r"os_error_code='?(\d+)", str(e))
    code = int(found[1]) if found else None
  if code in errno.errorcode:
    return os.strerror(code)[0].lower() + os.strerror(code)[1:]
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= 200 else text[:197] + "..."


def write_failed(path: Any, e: BaseException) -> WriteFailed:
  """The WriteFailed for writing `path` failing with `e`: 'no space left on device writing PATH'."""
  return WriteFailed(f"{cause(e)} writing {path}")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """The entry points' error handler: a UserError becomes `error: ...` on stderr and exit status 1
  (with its traceback too if CHARTX_DEBUG is set)."""
  try:
    yield
  except UserError as e:
    _print(e)
    exit_now(1)


def status_of(main: Callable[..., int], *args: Any) -> int:
  """The same handler for a tool whose main returns its exit status: main(*args), or 1 after
  printing a UserError's one line."""
  try:
    return main(*args)
  except UserError as e:
    _print(e)
    return 1


def _print(e: UserError) -> None:
  if debug():
    traceback.print_exception(e)
  print(f"error: {e}", file=sys.stderr, flush=True)


def exit_now(status: int) -> None:
  """Exits with `status`. A writer thread stuck on a failing disk (Orbax's save threads are not
  daemons) would hold the interpreter's exit forever: then the process ends without waiting."""
  stuck = [t for t in threading.enumerate()
           if t is not threading.main_thread() and t.is_alive() and not t.daemon]
  if stuck:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def quiet_library_errors() -> None:
  """Once per process: Orbax logs each failed write of an asynchronous save at ERROR with a
  traceback, from several threads; chartx reports the failure in one line instead. CHARTX_DEBUG
  keeps them."""
  logger = std_logging.getLogger("absl")
  if debug() or any(getattr(f, "chartx_quiet", False) for f in logger.filters):
    return

  def keep(record: std_logging.LogRecord) -> bool:
    return not (record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)

  keep.chartx_quiet = True
  logger.addFilter(keep)


def parse_flags(argv: list[str], config: flags.FlagHolder) -> list[str]:
  """absl's parser for app.run: a bad flag, config file or --config override prints one line, exit 1."""
  try:
    argv = flags.FLAGS(argv)
    if config.value is not None:  # None: no --config (main says whether it needs one).
      config.value.get("seed")  # config_flags defers a config file's load error to first use.
    return argv
  except Exception as e:  # absl and config_flags raise many types; all mean a bad command line.
    with one_line_errors():
      raise UserError(_unknown_key(argv, e) or " ".join(str(e).split())) from e


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
