"""The launch scripts: the commands their dry runs print, their flag errors, and the GPU
cluster script's process handling with a stand-in for ssh. Needs bash, not gcloud or ssh."""

import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
# Awkward on purpose: spaces, a quote and a dollar sign must reach chartx.main unchanged.
PROMPT = "--config.sample.prompt=it's $5 a line"
TPU_FLAGS = [
    "--name=chartx-test", "--tpu-type=v4-32", "--zone=us-central2-b", "--project=my-proj",
    "--config=configs/enwik8_64l.py", "--workdir=gs://bucket/t64",
]


def launch(script: str, *args: str, env: dict[str, str] | None = None,
           path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess:
  """Runs launch/SCRIPT with ARGS in a clean environment (no gcloud, no ssh, no CHARTX_*)."""
  return subprocess.run(
      ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=20,
      env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **(env or {})})


def dry_run(script: str, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
  """The commands a dry run prints, each split into its argv as a shell would split it."""
  result = launch(script, "--dry-run", *args, env=env)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def flag(argv: list[str], name: str) -> str:
  (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return value


def chartx_main_args(shell_line: str) -> list[str]:
  """The arguments that the remote shell line passes to `python -m chartx.main`."""
  words = shlex.split(shell_line)
  return words[words.index("chartx.main") + 1:]


def test_tpu_vm_creates_installs_runs_on_all_workers_then_deletes():
  cmds = dry_run("tpu_vm.sh", *TPU_FLAGS, "--", "--config.train.num_steps=10", PROMPT)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  assert [c[:5] for c in gcloud] == [["gcloud", "compute", "tpus", "tpu-vm", verb]
                                     for verb in ("create", "scp", "ssh", "ssh", "delete")]
  assert all("--zone=us-central2-b" in c and "--project=my-proj" in c for c in gcloud)
  create, scp, install, train, delete = gcloud
  assert all(c[5] == "chartx-test" for c in (create, install, train, delete))
  assert flag(create, "accelerator-type") == "v4-32"
  assert flag(create, "version") == "tpu-ubuntu2204-base"
  # The tarball is made before it is copied, and copied to every worker.
  (archive,) = [c for c in cmds if c[0] == "git"]
  assert cmds.index(archive) < cmds.index(scp) and scp[5] in archive
  assert scp[6] == "chartx-test:chartx.tar.gz"
  assert all("--worker=all" in c for c in (scp, install, train))
  assert '"jax[tpu]"' in flag(install, "command")
  assert chartx_main_args(flag(train, "command")) == [
      "--config=configs/enwik8_64l.py", "--workdir=gs://bucket/t64",
      "--config.train.num_steps=10", PROMPT]


def test_tpu_vm_flags_from_environment_keep_and_runtime_for_v5e():
  env = {"CHARTX_ZONE": "us-west4-a", "CHARTX_PROJECT": "env-proj", "DRY_RUN": "1"}
  result = launch("tpu_vm.sh", "--name=x", "--tpu-type=v5litepod-16", "--config=c.py",
                  "--workdir=/local/dir", "--keep", env=env)
  assert result.returncode == 0, result.stderr
  cmds = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [c[4] for c in cmds if c[0] == "gcloud"] == ["create", "scp", "ssh", "ssh"]
  assert flag(cmds[0], "zone") == "us-west4-a" and flag(cmds[0], "project") == "env-proj"
  assert flag(cmds[0], "version") == "v2-alpha-tpuv5-lite"


@pytest.mark.parametrize("script,args,culprit", [
    ("tpu_vm.sh", [a for a in TPU_FLAGS if not a.startswith("--zone")], "--zone"),
    ("tpu_vm.sh", [a for a in TPU_FLAGS if not a.startswith("--workdir")] + ["--workdir=/tmp/x"],
     "--workdir"),
    ("gpu_host.sh", ["--config=c.py"], "--workdir"),
    ("gpu_cluster.sh", ["--config=c.py", "--workdir=/w"], "--hosts"),
    ("gpu_host.sh", ["--config=c.py", "--workdir=/w", "--zone=z"], "--zone"),
    ("slurm.sbatch", ["--workdir=/w"], "--config"),
    ("slurm.sbatch", ["--config=c.py", "--workdir=/w", "--hosts=a"], "--hosts"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(script, args, culprit):
  result = launch(script, "--dry-run", *args)
  assert result.returncode == 2
  assert result.stdout == "" and len(result.stderr.splitlines()) == 1
  assert culprit in result.stderr


def test_gpu_host_installs_then_runs_one_process():
  cmds = dry_run("gpu_host.sh", "--install", "--jax-extra=cuda12", "--config=configs/t.py",
                 "--workdir=/runs/a", "--", "--mode=eval", PROMPT)
  install, train = cmds
  assert install[:2] == ["bash", "-c"] and '"jax[cuda12]"' in install[2]
  assert train[0].endswith("/.venv/bin/python") and train[1:3] == ["-m", "chartx.main"]
  assert train[3:] == ["--config=configs/t.py", "--workdir=/runs/a", "--mode=eval", PROMPT]
  assert not any("--process_id" in a or "--coordinator_address" in a for a in train)


def test_slurm_sbatch_runs_one_srun_task_per_node_on_all_its_gpus():
  cmds = dry_run("slurm.sbatch", "--install", "--config=configs/t.py", "--workdir=/shared/a", "--",
                 "--mode=eval", PROMPT)
  install, train = cmds
  assert install[:2] == ["bash", "-c"] and '"jax[cuda13]"' in install[2]
  assert train[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
  assert train[4].endswith("/.venv/bin/python") and train[5:7] == ["-m", "chartx.main"]
  # No multi-process flags: chartx.main reads SLURM's environment (chartx.distributed).
  assert train[7:] == ["--config=configs/t.py", "--workdir=/shared/a", "--mode=eval", PROMPT]
  with open(LAUNCH / "slurm.sbatch", encoding="utf-8") as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  assert "--ntasks-per-node=1" in directives and "--gpus-per-node=8" in directives


def test_slurm_sbatch_run_from_the_spool_finds_the_checkout(tmp_path):
  # sbatch runs a copy of the script from its spool directory, with SLURM_SUBMIT_DIR the checkout.
  (tmp_path / "slurm_script").write_text((LAUNCH / "slurm.sbatch").read_text())
  result = subprocess.run(["bash", str(tmp_path / "slurm_script"), "--dry-run", "--config=c.py",
                           "--workdir=/w"], capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(LAUNCH.parent)})
  assert result.returncode == 0, result.stderr
  (train,) = [shlex.split(line) for line in result.stdout.splitlines()]
  assert train[4] == str(LAUNCH.parent / ".venv" / "bin" / "python")


def test_gpu_cluster_one_process_per_host_with_coordinator_of_host_0():
  hosts = ["alice@gpu-a", "gpu-b", "gpu-c"]
  cmds = dry_run("gpu_cluster.sh", f"--hosts={','.join(hosts)}", "--install",
                 "--config=configs/enwik8_64l.py", "--workdir=/shared/t64",
                 "--remote-dir=/opt/chart x", "--", PROMPT)
  installs, trains = cmds[:3], cmds[3:]
  assert [c[:2] for c in installs] == [["ssh", h] for h in hosts]
  assert [c[:3] for c in trains] == [["ssh", "-tt", h] for h in hosts]
  for i, train in enumerate(trains):
    assert shlex.split(train[3])[:2] == ["cd", "/opt/chart x"]
    assert chartx_main_args(train[3]) == [
        "--config=configs/enwik8_64l.py", "--workdir=/shared/t64", PROMPT,
        "--coordinator_address=gpu-a:8476", "--num_processes=3", f"--process_id={i}"]


def test_gpu_cluster_streams_prefixed_logs_and_fails_when_one_host_fails(tmp_path):
  # Stand-ins: `ssh [opts] HOST CMD` runs CMD here; the "python" prints its process id and
  # fails as process 1 when FAIL is set.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "ssh").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n'
                               'exec bash -c "$2"\n')
  (bin_dir / "python").write_text(
      '#!/bin/bash\nfor a; do [[ $a == --process_id=* ]] && id=${a#*=}; done\n'
      'echo "step 1 of process $id"\n[[ -z $FAIL || $id != 1 ]] || exit 3\n')
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  args = ["--hosts=h0,h1,h2", "--config=c.py", "--workdir=/w", f"--remote-dir={tmp_path}",
          f"--python={bin_dir / 'python'}"]
  path = f"{bin_dir}:/usr/bin:/bin"

  ok = launch("gpu_cluster.sh", *args, path=path)
  assert ok.returncode == 0, ok.stderr
  assert sorted(ok.stdout.splitlines()) == [f"[h{i}] step 1 of process {i}" for i in range(3)]
  failed = launch("gpu_cluster.sh", *args, path=path, env={"FAIL": "1"})
  assert failed.returncode == 3
