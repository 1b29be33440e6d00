"""Multi-process runs: when to start jax.distributed, and with what.

Every process runs the same program over one global mesh (chartx.sharding) and feeds its own
rows of each batch; process 0 alone logs, prints and writes metrics. A run has several processes

  - on GPU hosts (or any machines) given --coordinator_address=HOST:PORT (process 0's),
    --num_processes and --process_id, all three (launch/gpu_cluster.sh passes them);
  - on a Cloud TPU VM, recognized as JAX recognizes one when it is imported (libtpu installed,
    TPU chips on the PCI bus): jax.distributed.initialize() then finds the pod slice's workers
    in the TPU metadata by itself, and a single-host TPU VM becomes a one-process system.

Anything else (a laptop, one GPU host driving all its GPUs) is one process, and jax.distributed
is not started. This module loads JAX only to start it, so a bad flag fails at once.
"""

from typing import Any

from chartx.errors import UserError


def flag_args(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> dict[str, Any] | None:
  """jax.distributed.initialize's arguments from the three flags; None when none is given."""
  flags = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  missing = [flag for flag, value in flags.items() if value is None]
  if len(missing) == len(flags):
    return None
  if missing:
    raise UserError(f"{', '.join(missing)} missing: a multi-process run needs --coordinator_address, "
                    "--num_processes and --process_id together")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT (process 0's)")
  if num_processes < 1:
    raise UserError(f"--num_processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  return {"coordinator_address": coordinator_address, "num_processes": num_processes,
          "process_id": process_id}


def on_cloud_tpu_vm() -> bool:
  """JAX's own flag, set when it is imported on a Cloud TPU VM; its TPU cluster detection reads it."""
  from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
  return cloud_tpu_init.running_in_cloud_tpu_vm


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts jax.distributed with the three flags or on a Cloud TPU VM; otherwise does nothing.

  Call it before anything touches a JAX device.
  """
  args = flag_args(coordinator_address, num_processes, process_id)
  if args is None and not on_cloud_tpu_vm():
    return
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.distributed.initialize(**(args or {}))
  except (RuntimeError, ValueError) as e:
    where = args["coordinator_address"] if args else "the Cloud TPU metadata"
    raise UserError(f"jax.distributed.initialize failed ({where}): {str(e).splitlines()[0]}") from e
