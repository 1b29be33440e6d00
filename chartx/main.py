"""Command line: python -m chartx.main --config=configs/X.py --workdir=DIR [--mode=...] [--config.KEY=V].

--mode=eval and --mode=sample may leave out --config: they use the config the run saved.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from chartx import errors
from chartx.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with a get_config(). Optional for --mode=eval and sample: they "
    "use the config the run saved in WORKDIR/config.json.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "compile"],
                          "What to do. compile: compile the steps for config.compile.topology, a TPU "
                          "slice that need not be here (docs/tpu.md).")
# Several processes (GPU hosts): the three flags together start jax.distributed. Where JAX detects
# a cluster (Cloud TPU, SLURM, Open MPI, Kubernetes) it starts by itself (chartx.distributed).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process (GPU hosts): HOST:PORT of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0..N-1.")
flags.mark_flags_as_required(["workdir"])


def run(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise UserError(f"--config is required for --mode={_MODE.value} (eval and sample use the run's "
                    "saved config)")
  from chartx import malloc
  malloc.keep_freed_memory()  # Before JAX allocates anything (see chartx/malloc.py).
  # Imported late so --help and flag errors do not wait for JAX.
  from chartx import cpu_devices, distributed
  flagged = distributed.flag_args(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cpu_devices.split_cores(_CONFIG.value, _MODE.value,
                          multi_process=flagged is not None or distributed.detect_cluster() is not None)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax
  if jax.process_index() != 0:
    logging.set_verbosity(logging.ERROR)  # Process 0 alone logs, prints and writes metrics.
  from chartx import config, run_config
  if _MODE.value == "compile":  # For a TPU slice's devices, which need not be here.
    from chartx import aot
    devices = aot.target_devices(_CONFIG.value)
    config.check(_CONFIG.value, devices, devices[0].platform)
    aot.compile_config(_CONFIG.value, _WORKDIR.value, devices)
    return
  config.check(_CONFIG.value)  # Every key of every section, before anything slow.
  given = not run_config.is_saved(config_flags.get_config_filename(flags.FLAGS["config"]))
  if _MODE.value != "train" and given:  # A --config file: it must be the run's model and data.
    run_config.check_given(_CONFIG.value, _WORKDIR.value)
  if _MODE.value == "eval":
    from chartx import evaluate
    evaluate.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  elif _MODE.value == "sample":
    from chartx import sample
    text = sample.sample_checkpoint(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
      print(text, flush=True)
  else:
    from chartx import loop, signals
    signals.exit_quietly_when_finished()  # A SIGTERM after the loop has written all: status 0.
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  with errors.one_line_errors():
    run(argv)


def _parse_flags(argv: list[str]) -> list[str]:
  """errors.parse_flags, after giving --mode=eval/sample the run's saved config if no --config."""
  from chartx import run_config  # pylint: disable=import-outside-toplevel
  return errors.parse_flags(run_config.config_argv(argv), config=_CONFIG)


def cli() -> None:
  """The `chartx` console command (pyproject.toml), the same as python -m chartx.main."""
  errors.adopt_main_module(__name__, __doc__)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
