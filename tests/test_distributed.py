"""When jax.distributed starts, and with what: the flags, a cluster JAX detects (SLURM's
environment as srun sets it, a Cloud TPU VM), nothing on a laptop; and a job step whose processes
would each act as process 0 is stopped. jax.distributed.initialize is replaced by a recorder, so
nothing here starts a cluster."""

import os
import subprocess
import sys

import jax
import pytest

from chartx import distributed
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What srun sets for task 1 of a two-node step with one task per node (job 4242).
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
              "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_NUM_NODES": "2",
              "SLURM_NODELIST": "gpu[007-008]"}
SLURM_PORT = 4242 % 4096 + 65536 - 4096  # JAX's port for a SLURM job: from the job id.


@pytest.fixture
def calls(monkeypatch):
  """The arguments of each jax.distributed.initialize call, in an environment with no cluster."""
  for var in list(os.environ):
    if var.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_")):
      monkeypatch.delenv(var)
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  return recorded


def test_a_laptop_starts_nothing_and_the_flags_start_it(calls):
  distributed.initialize()
  assert calls == []
  distributed.initialize("127.0.0.1:1234", 1, 0)
  assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 1, "process_id": 0}]


def test_slurm_one_task_per_node_keeps_all_local_gpus(calls, monkeypatch):
  for var, value in SLURM_STEP.items():
    monkeypatch.setenv(var, value)
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # What the started system would report.
  assert distributed.detect_cluster().__name__ == "SlurmCluster"
  distributed.initialize()
  # JAX's own reading of SLURM's variables; no local_device_ids, so every GPU of the node is used.
  assert calls == [{"coordinator_address": f"gpu007:{SLURM_PORT}", "num_processes": 2,
                    "process_id": 1, "cluster_detection_method": "deactivate"}]


def test_slurm_several_tasks_per_node_get_one_gpu_each(calls, monkeypatch):
  for var, value in {**SLURM_STEP, "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
                     "SLURM_LOCALID": "1"}.items():
    monkeypatch.setenv(var, value)
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  distributed.initialize()
  assert calls[0]["num_processes"] == 4 and calls[0]["process_id"] == 3
  assert calls[0]["local_device_ids"] == [1]


def test_flags_win_over_the_cluster_environment(calls, monkeypatch):
  for var, value in SLURM_STEP.items():
    monkeypatch.setenv(var, value)
  # The flags name each process, so SLURM's count of 2 tasks need not match (ssh-started hosts
  # from inside an allocation, say); the recorder leaves JAX at one process.
  distributed.initialize("10.0.0.1:9000", 3, 0)
  assert calls == [{"coordinator_address": "10.0.0.1:9000", "num_processes": 3, "process_id": 0}]


def test_a_cloud_tpu_vm_lets_jax_read_its_metadata(calls, monkeypatch):
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(clusters.GceTpuCluster, "is_env_present", classmethod(lambda cls: True))
  distributed.initialize()
  assert calls == [{}]


def test_slurm_tasks_that_jax_cannot_join_are_a_user_error(calls, monkeypatch):
  # sbatch --ntasks=2 running python directly: SLURM counts 2 tasks, but there is no srun step.
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.detect_cluster() is None
  with pytest.raises(UserError, match=r"SLURM_NTASKS=2 says this job has 2 processes but JAX runs 1"):
    distributed.initialize()
  assert calls == []


def test_a_started_system_of_one_process_in_a_job_of_several_is_a_user_error(calls, monkeypatch):
  for var, value in SLURM_STEP.items():
    monkeypatch.setenv(var, value)
  with pytest.raises(UserError, match="act as process 0"):
    distributed.initialize()  # The recorder starts nothing: JAX still has one process.


def test_a_jax_without_its_cluster_module_degrades_to_the_environment_check(calls, monkeypatch):
  monkeypatch.setitem(sys.modules, "jax._src.clusters", None)  # Import fails, as after a move.
  monkeypatch.setitem(sys.modules, "jax._src.cloud_tpu_init", None)
  assert distributed.detect_cluster() is None
  distributed.initialize()  # A laptop is still fine.
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
  with pytest.raises(UserError, match="OMPI_COMM_WORLD_SIZE=8"):
    distributed.initialize()


def test_cli_stops_a_second_process_zero_in_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
  proc = subprocess.run([sys.executable, "-m", "chartx.main", "--config=configs/tiny.py",
                         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                        env={**env, "JAX_PLATFORMS": "cpu", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "3"},
                        timeout=300)
  assert proc.returncode == 1
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: SLURM_NTASKS=3 says this job has 3 processes but JAX runs 1")
  assert not os.listdir(tmp_path)  # Nothing written.
