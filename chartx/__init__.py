"""chartx: deep character-level transformer language models in JAX."""


def load(workdir: str, *, step: int | None = None, best: bool = False):
  """A trained run for Python programs: chartx.api.load (imported here only when called, so that
  `import chartx` and the command line's --help do not wait for JAX)."""
  from chartx import api  # pylint: disable=import-outside-toplevel
  return api.load(workdir, step=step, best=best)
