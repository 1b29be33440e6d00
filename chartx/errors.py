"""The one exception type for bad user input: main prints its message as one line and exits 1."""


class UserError(Exception):
  """A bad config key, file, flag or checkpoint; the message names the culprit."""
