"""Checkpoints and failures: exact resume after SIGKILL, SIGTERM, damaged checkpoints, other
meshes, NaN, keep-best, fine-tuning, and bad workdirs. Real signals, real Orbax files on disk."""

import functools
import gc
import glob
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

from chartx import checkpoint, data, loop, resume, sharding, train
from chartx.errors import UserError
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# tiny trains on chartx's own sources, which may change while the tests run; runs that are
# compared bit for bit need a text that does not.
_WORDS = ("the of and to in is was for that on with as by at from his an are which character "
          "model layer attention window context predict checkpoint resume signal").split()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "text.txt"
  path.write_text(" ".join(np.random.default_rng(0).choice(_WORDS, size=8000)) + "\n")
  return str(path)


def _config(text, **train_keys):
  """tiny on `text`, without validation runs (they cost time and change no state)."""
  config = tiny.get_config()
  config.data.path = text
  config.train.eval_every = 0
  config.train.update(train_keys)
  return config


def _steps(workdir):
  """The finalized checkpoint steps on disk (Orbax's own view, read afresh)."""
  manager = checkpoint.make_manager(str(workdir))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _init(config, abstract=False):
  """The state a run of `config` starts from (only shapes and dtypes if abstract)."""
  corpus = data.load_corpus(config.data)
  task = train.make_task(config, corpus.vocab.size)
  if abstract:
    return jax.eval_shape(lambda: flax.linen.unbox(
        train.init_state(task, jax.random.key(config.seed), config.data.seq_len)))
  _, _, create = sharding.sharded_init(
      functools.partial(train.init_state, task, seq_len=config.data.seq_len),
      sharding.make_mesh(config), sharding.logical_rules(config))
  return create(jax.random.key(config.seed))


@pytest.fixture(scope="module")
def fresh(text):
  """tiny's initial state, as a target to restore onto (restoring leaves it as it is)."""
  return _init(_config(text))


def _restore(workdir, like, step):
  manager = checkpoint.make_manager(str(workdir))
  try:
    return checkpoint.restore(manager, like, step)
  finally:
    manager.close()


def _assert_bitwise_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _env(devices=1):
  # Without LLVM's optimizations tiny compiles in half the time; runs compared bit for bit share it.
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")


def _cli(workdir, text, **overrides):
  """Starts `python -m chartx.main` on configs/tiny.py with --config.KEY=VALUE overrides; its
  output goes to WORKDIR.log (a file: a pipe nobody reads could fill up and stall the run)."""
  args = [sys.executable, "-m", "chartx.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.path={text}"]
  args += [f"--config.{key}={value}" for key, value in overrides.items()]
  with open(f"{workdir}.log", "a", encoding="utf-8") as log:
    return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, workdir, timeout=300):
  """(exit status, the output so far) once proc has ended."""
  proc.wait(timeout=timeout)
  with open(f"{workdir}.log", encoding="utf-8") as f:
    return proc.returncode, f.read()


def _logged_steps(workdir):
  """The steps of the training records in metrics.jsonl, in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  # The last line may be half-written while the run goes on.
  records = [json.loads(line) for line in lines if line.endswith("}")]
  return [r["step"] for r in records if "loss" in r]


def _wait_for_step(proc, workdir, step, timeout=120):
  """Waits until metrics.jsonl shows `step`; fails if the process ends first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(_logged_steps(workdir), default=0) >= step:
      return
    assert proc.poll() is None, f"the run ended before step {step}: {_finish(proc, workdir)}"
    time.sleep(0.01)
  raise AssertionError(f"no step {step} in {workdir}/metrics.jsonl after {timeout} s")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text, fresh):
  """(workdir, config, {step: state}): checkpoints 5, 10, 15 and 20 of tiny's state, each with
  the step added to every parameter so that they differ; copy the workdir before changing it."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = _config(text, num_steps=20, checkpoint_every=5, keep_checkpoints=0)
  manager = checkpoint.make_manager(workdir, config)
  states = {}
  for step in (5, 10, 15, 20):
    states[step] = fresh.replace(step=np.int32(step),
                                 params=jax.tree.map(lambda p, s=step: p + s, fresh.params))
    checkpoint.save(manager, step, states[step])
  manager.close()
  return workdir, config, jax.device_get(states)


def _copy(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  return workdir


# Transformer-XL: configs/tiny.py with a memory, trained on streams that the memory carries on.
XL = {"model.family": "xl", "model.mem_len": 16}


@pytest.mark.parametrize("family", ["fixed", "xl"])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tmp_path, text, fresh, family):
  """SIGKILL at a random step (mid-step or mid-save), restart: the final state, parameters,
  optimizer state and (XL) memory, is bitwise that of an uninterrupted run of the same length."""
  num_steps, every = (100, 10) if family == "fixed" else (50, 5)  # XL: fewer, slower steps.
  kill_at = random.randint(3 * every, num_steps - 3 * every)
  overrides = {"train.num_steps": num_steps, "train.checkpoint_every": every,
               "train.log_every": 1, "train.eval_every": 0, **(XL if family == "xl" else {})}
  reference_dir, victim_dir = str(tmp_path / "reference"), str(tmp_path / "victim")
  reference, victim = _cli(reference_dir, text, **overrides), _cli(victim_dir, text, **overrides)
  _wait_for_step(victim, victim_dir, kill_at)
  victim.send_signal(signal.SIGKILL)
  assert _finish(victim, victim_dir)[0] == -signal.SIGKILL, f"kill at step {kill_at}"
  saved = _steps(victim_dir)
  assert saved and saved[-1] < num_steps, f"kill at step {kill_at}: checkpoints {saved}"
  logged = len(_logged_steps(victim_dir))

  restart = _cli(victim_dir, text, **overrides)
  status, out = _finish(restart, victim_dir)
  assert status == 0, out
  # The restart continued from the newest complete checkpoint, not from scratch.
  assert _logged_steps(victim_dir)[logged] == saved[-1] + 1, f"kill at step {kill_at}"
  status, out = _finish(reference, reference_dir)
  assert status == 0, out

  if family == "xl":
    config = _config(text)
    config.model.update({key.split(".")[1]: value for key, value in XL.items()})
    fresh = _init(config)
    assert fresh.memory is not None
  final = jax.device_get(_restore(victim_dir, fresh, num_steps))
  _assert_bitwise_equal(final, jax.device_get(_restore(reference_dir, fresh, num_steps)))
  if family == "xl":
    assert final.memory.valid_B.tolist() == [16] * 8  # The memory was saved and restored too.


def test_a_checkpoint_saved_before_the_state_had_a_memory_restores(tmp_path, fresh):
  """A fixed-family checkpoint written before TrainState gained its memory field (a tree without
  it) restores onto today's state, whose memory is None."""
  @flax.struct.dataclass
  class OldTrainState:  # TrainState before Transformer-XL.
    step: jax.Array
    params: dict
    opt_state: tuple
    loss_weights: jax.Array

  old = OldTrainState(step=np.int32(7), params=fresh.params, opt_state=fresh.opt_state,
                      loss_weights=fresh.loss_weights)
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 7, old)
  manager.close()
  restored = _restore(tmp_path, fresh, 7)
  assert int(restored.step) == 7 and restored.memory is None
  _assert_bitwise_equal(jax.device_get(restored.params), jax.device_get(fresh.params))


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, text, fresh):
  workdir = str(tmp_path / "run")
  proc = _cli(workdir, text, **{"train.num_steps": 100_000, "train.checkpoint_every": 100_000,
                          "train.log_every": 1, "train.eval_every": 0})
  _wait_for_step(proc, workdir, 5)
  proc.send_signal(signal.SIGTERM)
  status, out = _finish(proc, workdir, timeout=120)
  assert status == 0, out
  stopped = int(re.search(r"SIGTERM: stopped after step (\d+)", out).group(1))
  assert 5 <= stopped < 100_000
  assert _steps(workdir) == [stopped]  # The only checkpoint: the one the signal asked for.
  assert int(_restore(workdir, fresh, stopped).step) == stopped
  assert max(_logged_steps(workdir)) <= stopped


def test_a_half_written_checkpoint_is_removed_with_a_warning_and_the_newest_good_one_used(
    trained, tmp_path, caplog, fresh):
  workdir = _copy(trained, tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  half = os.path.join(ckpt_dir, "20.orbax-checkpoint-tmp")  # Where Orbax 0.12 writes step 20.
  os.rename(os.path.join(ckpt_dir, "20"), half)
  with caplog.at_level(logging.WARNING), resume.Checkpoints(workdir, trained[1]) as checkpoints:
    state = checkpoints.restore_or_init(fresh)
    _assert_bitwise_equal(jax.device_get(state), trained[2][15])
    assert any(half in r.getMessage() for r in caplog.records)
    assert not os.path.exists(half)
    checkpoints.save(20, state)  # The step that was cut short can be saved again.
  assert _steps(workdir) == [5, 10, 15, 20]


# Orbax leaves the reads it started for a damaged checkpoint as coroutines that complain when
# collected; collected here, in this test, they are expected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_checkpoint_is_set_aside_with_a_warning_and_the_newest_good_one_used(
    trained, tmp_path, caplog, fresh):
  workdir = _copy(trained, tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  chunks = glob.glob(os.path.join(ckpt_dir, "20", "default", "ocdbt.process_0", "d", "*"))
  assert chunks
  for path in chunks:  # Array data cut short, as by a full disk or a crash of the file system.
    os.truncate(path, os.path.getsize(path) // 2)
  config = trained[1]
  checkpoints = resume.Checkpoints(workdir, config)
  with caplog.at_level(logging.WARNING), checkpoints:
    state = checkpoints.restore_or_init(fresh)
  gc.collect()
  _assert_bitwise_equal(jax.device_get(state), trained[2][15])
  assert any(os.path.join(ckpt_dir, "20") in r.getMessage() and "cannot be read" in r.getMessage()
             for r in caplog.records)
  assert _steps(workdir) == [5, 10, 15]
  assert len(glob.glob(os.path.join(ckpt_dir, "20.unreadable-*"))) == 1  # Kept, out of the way.


def test_unreadable_checkpoints_stop_training_instead_of_starting_over(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "default", "manifest.ocdbt")):
    os.truncate(path, 10)
  with pytest.raises(UserError, match=r"no checkpoint in .*checkpoints can be read"):
    loop.train_and_evaluate(trained[1], workdir)
  assert _steps(workdir) == [5, 10, 15, 20]  # Nothing renamed, nothing new.


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, text, fresh):
  """A learning rate of 1e30 makes the run diverge within a few steps; it checkpoints every
  step, and logs too rarely for the log to be what notices."""
  workdir = str(tmp_path / "run")
  config = _config(text, num_steps=40, checkpoint_every=1, keep_checkpoints=0, log_every=1000)
  config.optimizer.learning_rate = 1e30
  with pytest.raises(UserError, match=r"step \d+") as raised:
    loop.train_and_evaluate(config, workdir)
  message = str(raised.value)
  bad_step = int(re.search(r"step (\d+)", message).group(1))
  saved = _steps(workdir)
  # Every step before the bad one was saved, the bad one's state was not.
  assert saved[-1] == bad_step - 1
  assert os.path.join(workdir, "checkpoints", str(saved[-1])) in message and "intact" in message
  newest = jax.device_get(_restore(workdir, fresh, saved[-1]))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(newest))


def test_a_state_holding_nan_or_inf_is_never_saved(tmp_path, text):
  """The loop's loss check cannot see an update that overflows the parameters; save can."""
  manager = checkpoint.make_manager(str(tmp_path), _config(text))
  checkpoint.save(manager, 1, {"params": {"w": np.ones(3, np.float32)}})
  for bad in (np.nan, np.inf):
    with pytest.raises(UserError, match=r"after step 2 holds NaN or Inf .*checkpoints/1, is intact"):
      checkpoint.save(manager, 2, {"params": {"w": np.array([1.0, bad, 1.0], np.float32)}})
  manager.close()
  assert _steps(tmp_path) == [1]


def test_keep_the_newest_n_plus_the_best_by_validation_bpc(tmp_path, text):
  config = _config(text, keep_checkpoints=2)
  manager = checkpoint.make_manager(str(tmp_path), config)
  bpcs = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: None}
  for step, bpc in bpcs.items():
    state = {"step": np.int32(step), "params": {"w": np.full((3,), step, np.float32)}}
    checkpoint.save(manager, step, state, None if bpc is None else {"validation_bpc": bpc})
  manager.wait_until_finished()
  manager.close()
  assert _steps(tmp_path) == [2, 4, 5]  # The best (2), and the newest two.
  params, step = checkpoint.restore_params(str(tmp_path), {"w": np.zeros(3, np.float32)}, "best")
  assert step == 2 and np.asarray(params["w"]).tolist() == [2.0, 2.0, 2.0]
  params, step = checkpoint.restore_params(str(tmp_path), {"w": np.zeros(3, np.float32)})
  assert step == 5 and np.asarray(params["w"]).tolist() == [5.0, 5.0, 5.0]
  with pytest.raises(UserError, match=r"no checkpoint 3 in .*steps: 2, 4, 5"):
    checkpoint.restore_params(str(tmp_path), {"w": np.zeros(3, np.float32)}, 3)


def test_a_new_best_validation_bpc_is_saved_between_scheduled_checkpoints(tmp_path, text):
  config = _config(text, checkpoint_every=10, num_steps=100)
  with resume.Checkpoints(str(tmp_path), config) as checkpoints:
    assert checkpoints.due(10, None, stop=False) and checkpoints.due(100, None, stop=False)
    assert checkpoints.due(3, None, stop=True)
    assert not checkpoints.due(3, None, stop=False)
    assert checkpoints.due(3, {"validation_bpc": 2.0}, stop=False)  # The first is the best yet.
    checkpoints.save(3, {"params": {"w": np.zeros(2, np.float32)}}, {"validation_bpc": 2.0})
    assert not checkpoints.due(5, {"validation_bpc": 2.5}, stop=False)
    assert checkpoints.due(5, {"validation_bpc": 1.5}, stop=False)
  config.train.checkpoint_every = 0  # Off means off, signals included.
  with resume.Checkpoints(str(tmp_path / "off"), config) as checkpoints:
    assert not checkpoints.due(100, None, stop=True)


def test_init_from_another_run_takes_its_params_at_step_0_with_fresh_optimizer_state(
    trained, tmp_path, text, fresh):
  config = _config(text, num_steps=20)
  config.checkpoint.init_from = trained[0]
  with resume.Checkpoints(str(tmp_path / "finetune"), config) as checkpoints:
    state = jax.device_get(checkpoints.restore_or_init(fresh))
  assert int(state.step) == 0
  _assert_bitwise_equal(state.params, trained[2][20].params)
  _assert_bitwise_equal(state.opt_state, jax.device_get(fresh.opt_state))
  assert _steps(tmp_path / "finetune") == []


def test_resume_false_starts_over_and_keeps_the_old_checkpoints_aside(
    trained, tmp_path, text, fresh):
  workdir = _copy(trained, tmp_path)
  config = _config(text, num_steps=20)
  config.checkpoint.resume = False
  with resume.Checkpoints(workdir, config) as checkpoints:
    state = checkpoints.restore_or_init(fresh)
  assert int(state.step) == 0
  assert _steps(workdir) == []
  aside = glob.glob(os.path.join(workdir, "checkpoints.replaced-*"))
  assert len(aside) == 1 and sorted(os.listdir(aside[0])) == ["10", "15", "20", "5"]


def test_a_workdir_of_another_model_shape_names_the_parameter(trained, tmp_path, text):
  workdir = _copy(trained, tmp_path)
  config = _config(text, num_steps=20)
  config.model.num_layers = 3
  with pytest.raises(UserError) as raised:
    loop.train_and_evaluate(config, workdir)
  message = str(raised.value)
  assert "\n" not in message
  assert re.search(r"checkpoints/20 does not fit this config: params/\S+ has shape \(2, .*\) "
                   r"there but \(3, .*\) with this config", message), message
  config.model.num_layers, config.model.d_model = 2, 64
  config.checkpoint.init_from = trained[0]
  with (pytest.raises(UserError, match=r"config.checkpoint.init_from=.*params/\S+ has shape"),
        resume.Checkpoints(str(tmp_path / "finetune"), config) as checkpoints):
    checkpoints.restore_or_init(_init(config, abstract=True))


def test_a_workdir_that_is_a_file_is_a_user_error(tmp_path, text):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with pytest.raises(UserError, match=rf"--workdir {re.escape(str(path))} is a file"):
    loop.train_and_evaluate(_config(text), str(path))


_UNREADABLE = """
import sys
from chartx import loop
from chartx.errors import UserError
from configs import tiny
try:
  loop.train_and_evaluate(tiny.get_config(), sys.argv[1])
except UserError as e:
  print(e)
"""


def test_an_unreadable_workdir_is_a_user_error(tmp_path):
  workdir = tmp_path / "locked"
  workdir.mkdir()
  command = [sys.executable, "-c", _UNREADABLE, str(workdir)]
  if os.geteuid() == 0:  # Root reads anything unless it drops the capabilities that allow it.
    capsh = shutil.which("capsh")
    if capsh is None:
      pytest.skip("running as root without capsh: cannot make a directory unreadable")
    command = [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
               shlex.join(command)]
  workdir.chmod(0)
  try:
    out = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120).stdout
  finally:
    workdir.chmod(0o755)
  assert f"--workdir {workdir} cannot be read: Permission denied" in out, out


_CROSS_MESH = """
import json, sys
import jax, numpy as np
from chartx import checkpoint, loop
from configs import tiny

mesh_shape, workdir, text, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
config = tiny.get_config()
config.data.path = text
config.mesh.shape = tuple(mesh_shape)
config.train.update(num_steps=12, checkpoint_every=10, eval_every=0, log_every=1)
final = loop.train_and_evaluate(config, workdir)  # Resumes from step 10 if it is there.
# Checkpoint 10 onto this process's mesh: the whole state as training reads it, and the
# parameters alone as evaluation does.
manager = checkpoint.make_manager(workdir)
state10 = checkpoint.restore(manager, final, 10)
params10, step = checkpoint.restore_params(workdir, final.params, step=10)
assert step == 10
for restored, target in zip(jax.tree.leaves((state10, params10)), jax.tree.leaves((final, final.params))):
  assert restored.sharding == target.sharding, (restored.sharding, target.sharding)
flat = lambda prefix, tree: {prefix + jax.tree_util.keystr(k): np.asarray(v)
                             for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
np.savez(out, **flat("final", final.params), **flat("state10", state10), **flat("params10", params10))
print("devices", jax.device_count(), "step", int(final.step))
"""


def test_save_on_8_devices_restore_on_1_and_4_for_training_and_eval(tmp_path, text):
  """The 8-device run (mesh data 2 x fsdp 2 x tensor 2) trains 12 steps, saving at 10 and 12.
  Copies of its workdir without checkpoint 12 resume from 10 on 1 device and on 4 (fsdp 4):
  checkpoint 10 restores there bitwise (whole state, and parameters alone), and their step-12
  parameters match the 8-device ones up to float rounding (reductions split differently)."""
  def start(devices, mesh_shape, workdir):
    return subprocess.Popen(
        [sys.executable, "-c", _CROSS_MESH, json.dumps(mesh_shape), workdir, text,
         str(tmp_path / f"{devices}.npz")],
        cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out

  source = str(tmp_path / "devices8")
  assert "devices 8 step 12" in finish(start(8, [2, 2, 2], source))
  resumed = {}
  for devices, mesh_shape in ((1, [1, 1, 1]), (4, [1, 4, 1])):
    workdir = str(tmp_path / f"devices{devices}")
    shutil.copytree(source, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    resumed[devices] = start(devices, mesh_shape, workdir)
  for devices, proc in resumed.items():
    assert f"devices {devices} step 12" in finish(proc)
    assert _logged_steps(str(tmp_path / f"devices{devices}")) == [11, 12]  # It resumed at 10.
  results = {d: dict(np.load(tmp_path / f"{d}.npz")) for d in (8, 1, 4)}
  assert any(key.startswith("state10.opt_state") for key in results[8])
  for devices in (1, 4):
    assert results[devices].keys() == results[8].keys()
    for key, value in results[8].items():
      if key.startswith("final"):
        np.testing.assert_allclose(results[devices][key], value, rtol=1e-4, atol=1e-6,
                                   err_msg=f"{devices} devices: {key}")
      else:
        assert value.tobytes() == results[devices][key].tobytes(), (devices, key)
