"""Bad user input: one exception type, and a flag parser that reports every bad flag as one line."""

import sys

from absl import flags


class UserError(Exception):
  """A bad config key, file, flag or checkpoint; the message names the culprit."""


def parse_flags(argv: list[str], config: flags.FlagHolder) -> list[str]:
  """absl's parser for app.run: a bad flag, config file or --config override prints one line, exit 1."""
  try:
    argv = flags.FLAGS(argv)
    config.value.get("seed")  # config_flags defers a config file's load error to first use.
    return argv
  except Exception as e:  # absl and config_flags raise many types; all mean a bad command line.
    print(f"error: {_culprit(argv, e)}{' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def _culprit(argv: list[str], e: Exception) -> str:
  """Names the override an unknown-key error comes from: AttributeError('foo') -> --config.model.foo."""
  if isinstance(e, flags.Error):
    return ""
  missing = str(e).strip("\"' ")
  for arg in argv[1:]:
    key = arg.split("=", 1)[0]
    if key.startswith("--config.") and missing in key[len("--config."):].split("."):
      return f"{key}: no such config key; "
  return ""
