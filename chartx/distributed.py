"""Multi-process runs: when to start jax.distributed, and with what.

Every process runs the same program over one global mesh (chartx.sharding) and feeds its own
rows of each batch; process 0 alone logs, prints and writes metrics. A run has several processes

  - given --coordinator_address=HOST:PORT (process 0's), --num_processes and --process_id, all
    three, on any machines (launch/gpu_cluster.sh passes them);
  - in a cluster environment that JAX recognizes by itself (jax._src.clusters): a SLURM job step
    (srun; launch/slurm.sbatch), Open MPI (mpirun), a Cloud TPU VM or pod slice (its metadata),
    Kubernetes. The environment gives the coordinator, the process count and this process's id.

Anything else (a laptop, one GPU host driving all its GPUs) is one process, and jax.distributed
is not started. Without the flags, the environment's own count of processes (SLURM_NTASKS,
OMPI_COMM_WORLD_SIZE) must match JAX's afterwards: a second process that would silently act as
process 0 and write to the same workdir stops with a UserError instead. This module loads JAX
only to start it, so a bad flag fails at once.
"""

import os
from typing import Any

from chartx.errors import UserError

# Environment variables that cluster launchers set to the number of processes of the job step.
_PROCESS_COUNT_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
# JAX reads a TPU VM's metadata itself (with retries and timeouts): chartx passes it nothing.
_TPU_CLUSTERS = ("GceTpuCluster", "GkeTpuCluster")


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


def detect_cluster() -> type | None:
  """The jax._src.clusters.ClusterEnv that jax.distributed.initialize() would pick here (the first
  present of those it tries unasked), or None: not in a cluster, or a JAX whose private cluster
  module moved (then check_process_count still stops a job step that has several processes)."""
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
    candidates = [env for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
                  if not env.opt_in_only_method]
  except (ImportError, AttributeError):
    return None
  return next((env for env in candidates if env.is_env_present()), None)


def processes_on_this_node() -> int | None:
  """How many processes of the job run on this machine, where the launcher says so."""
  if "OMPI_COMM_WORLD_LOCAL_SIZE" in os.environ:
    return int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
  if "SLURM_NTASKS" in os.environ and "SLURM_STEP_NUM_NODES" in os.environ:
    return -(-int(os.environ["SLURM_NTASKS"]) // int(os.environ["SLURM_STEP_NUM_NODES"]))
  return None


def cluster_args(env: type) -> dict[str, Any]:
  """jax.distributed.initialize's arguments in cluster `env`, read by JAX's own ClusterEnv.

  JAX by itself gives each process of a SLURM or MPI job one GPU (its local rank); chartx runs one
  process per node driving all of the node's GPUs (launch/slurm.sbatch), so it keeps JAX's
  one-device-per-process only where several processes share a node.
  """
  if env.__name__ in _TPU_CLUSTERS:
    return {}
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or env.get_coordinator_address(
      timeout_secs=None, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
  args = {"coordinator_address": coordinator, "num_processes": env.get_process_count(),
          "process_id": env.get_process_id(),
          # Every argument is given: JAX must not detect local_device_ids on top of them.
          "cluster_detection_method": "deactivate"}
  local_rank, on_node = env.get_local_process_id(), processes_on_this_node()
  if local_rank is not None and on_node != 1:
    args["local_device_ids"] = [local_rank]
  return args


def check_process_count(process_count: int) -> None:
  """UserError if the launcher says the job has another number of processes than JAX runs."""
  for var in _PROCESS_COUNT_VARS:
    value = os.environ.get(var, "")
    if value.isdigit() and int(value) != process_count:
      raise UserError(
          f"{var}={value} says this job has {value} processes but JAX runs {process_count}, so each "
          "would act as process 0 and write to the same workdir; start them with srun "
          "(launch/slurm.sbatch) or mpirun where JAX detects the cluster, or pass "
          "--coordinator_address, --num_processes and --process_id")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts jax.distributed from the three flags or a detected cluster; otherwise does nothing.
  Then checks the process count against the environment's. Call it before anything touches a
  JAX device.
  """
  flagged = flag_args(coordinator_address, num_processes, process_id)
  env = detect_cluster() if flagged is None else None
  import jax  # pylint: disable=import-outside-toplevel
  if flagged is not None or env is not None:
    args = flagged if flagged is not None else cluster_args(env)
    try:
      jax.distributed.initialize(**args)
    except (RuntimeError, ValueError) as e:
      where = args.get("coordinator_address") or f"{env.__name__} detected by JAX"
      raise UserError(f"jax.distributed.initialize failed ({where}): {str(e).splitlines()[0]}") from e
  if flagged is None:  # The flags name every process; without them, each might think it is 0.
    check_process_count(jax.process_count())
