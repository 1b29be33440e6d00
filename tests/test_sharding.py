"""Sharding and multi-host: mesh and rule errors, the sharded train step on 8 simulated CPU devices
equal to one device (Transformer-XL's with its memory too), the multi-host flags, and a real two-process jax.distributed run.

The 8-device check (tests/sharding_worker.py) and the two-process run need processes of their
own; they start together, in the background, when the first test asks for them.
"""

import functools
import json
import os
import re
import socket
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from chartx import distributed, sharding, train
from chartx.tools import layout
from chartx.errors import UserError
from configs import enwik8_64l, text8_12l

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400


def _env():
  # One CPU device per process, compiled without LLVM's optimizations: half the compile time.
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _main_cmd(workdir, text, *extra):
  """chartx.main on configs/tiny.py, 6 steps on `text`, metrics every 3 steps, no eval/checkpoint."""
  return [sys.executable, "-m", "chartx.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.path={text}", "--config.train.num_steps=6", "--config.train.log_every=3",
          "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
          "--config.mesh.shape=(1,-1,1)", *extra]


@pytest.fixture(scope="module")
def background(tmp_path_factory):
  """Starts the 8-device worker, a one-process run and a two-process run, all at once."""
  tmp = tmp_path_factory.mktemp("sharding")
  # A fixed text: the repository's sources (tiny's default corpus) change while others work.
  text = tmp / "text.txt"
  text.write_text(" ".join(f"word{i % 37} of {i % 11} chars" for i in range(3000)) + "\n")
  launch = functools.partial(subprocess.Popen, cwd=ROOT, env=_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  procs = {"worker": launch([sys.executable, "tests/sharding_worker.py", str(tmp / "worker.json")]),
           "single": launch(_main_cmd(tmp / "single", text))}
  coordinator = f"127.0.0.1:{_free_port()}"
  for i in range(2):
    procs[f"process{i}"] = launch(_main_cmd(tmp / "multi", text, f"--coordinator_address={coordinator}",
                                            "--num_processes=2", f"--process_id={i}"))
  yield tmp, procs
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
  try:
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    stdout, stderr = proc.communicate()
  assert proc.returncode == 0, stderr[-3000:]
  return stdout, stderr


@pytest.fixture(scope="module")
def worker(background):
  tmp, procs = background
  _finish(procs["worker"])
  return json.loads((tmp / "worker.json").read_text())


# --- Mesh, rules, batch: errors before anything compiles ----------------------------------------


def test_mesh_shape_fills_one_minus_one(tiny_config):
  tiny_config.mesh.shape = (2, -1, 2)
  assert sharding.mesh_shape(tiny_config, 16) == (2, 4, 2)
  tiny_config.mesh.shape = (-1, 1, 1)
  assert sharding.mesh_shape(tiny_config, 1) == (1, 1, 1)


@pytest.mark.parametrize("shape, devices, message", [
    ((3, 1, 1), 8, r"config.mesh.shape=\(3, 1, 1\) needs 3 devices, but 8 are available"),
    ((-1, 3, 1), 8, r"config.mesh.shape=\(-1, 3, 1\) does not divide the 8 devices"),
    ((-1, -1, 1), 8, "at most one -1"),
    ((0, 1, 8), 8, "must be positive"),
    ((8, 1), 8, "needs 3 entries"),
])
def test_mesh_that_does_not_fit_is_a_user_error(tiny_config, shape, devices, message):
  tiny_config.mesh.shape = shape
  with pytest.raises(UserError, match=message):
    sharding.mesh_shape(tiny_config, devices)


def test_batch_must_divide_over_data_and_fsdp():
  mesh = AbstractMesh((2, 4, 1), sharding.MESH_AXES)
  sharding.check_batch(16, mesh, "config.train.batch_size")
  with pytest.raises(UserError, match=r"config.train.batch_size=12 .* 8 data-parallel devices "
                                      r"\(mesh data x fsdp = 2 x 4\)"):
    sharding.check_batch(12, mesh, "config.train.batch_size")


def test_rules_naming_an_unknown_mesh_axis_are_a_user_error(tiny_config):
  tiny_config.mesh.rules = (("batch", ("data", "fsdp")), ("embed", "model"))
  with pytest.raises(UserError,
                     match=r"config.mesh.rules: \('embed', 'model'\) names mesh axis 'model'"):
    sharding.logical_rules(tiny_config)
  tiny_config.mesh.rules = (("batch",),)
  with pytest.raises(UserError, match="not a .logical axis name, mesh axes. pair"):
    sharding.logical_rules(tiny_config)


def test_errors_come_before_any_compilation(worker):
  message, compiles = worker["mesh_error"]
  assert message == "config.mesh.shape=(3, 1, 1) needs 3 devices, but 8 are available"
  assert compiles == 0
  message, compiles = worker["batch_error"]
  assert message.startswith("config.train.batch_size=12 is not a positive multiple of the 8 ")
  assert compiles == 0


# --- Shardings of the state, read on abstract meshes --------------------------------------------


def _abstract_state(config, vocab_size):
  task = train.make_task(config, vocab_size)
  return jax.eval_shape(functools.partial(train.init_state, task, seq_len=config.data.seq_len),
                        jax.random.key(0))


def test_scanned_parameters_get_a_leading_unsharded_layers_axis():
  """The scan adds 'layers' in front of each block parameter's names; 'layers' maps to no axis."""
  config = enwik8_64l.get_config()
  boxed = _abstract_state(config, 256)
  query = boxed.params["layers"]["block"]["query"]
  assert query.names == ("layers", "embed", "heads", "head_dim")
  mesh = AbstractMesh((2, 4, 2), sharding.MESH_AXES)
  shardings = sharding.logical_shardings(boxed, mesh, sharding.logical_rules(config))
  assert tuple(shardings.params["layers"]["block"]["query"].spec) == (None, "fsdp", "tensor", None)
  assert tuple(shardings.params["layers"]["block"]["pos_embedding"].spec) == (None, None, "fsdp")
  # The optimizer's momentum is sharded like its parameter; the step is replicated.
  momentum = jax.tree.leaves(shardings.opt_state)
  assert any(tuple(s.spec) == (None, "fsdp", "tensor", None) for s in momentum)
  assert shardings.step.is_fully_replicated


def test_describe_a_pod_layout_of_the_64_layer_model_without_devices():
  config = enwik8_64l.get_config()
  boxed = _abstract_state(config, 256)
  mesh = AbstractMesh((4, 8, 2), sharding.MESH_AXES)
  shardings = sharding.logical_shardings(boxed, mesh, sharding.logical_rules(config))
  params = flax.linen.unbox(boxed).params
  # Every parameter has an embed (fsdp) or vocab (tensor) axis: no device holds one whole.
  assert layout.largest_replicated(params, shardings.params) is None
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert layout.bytes_per_device(params, shardings.params) <= total / 8
  text = layout.describe(params, shardings.params)
  assert text.splitlines()[0].startswith("mesh data=4 fsdp=8 tensor=2 (64 devices)")
  assert "largest array every device holds whole: none" in text
  assert len(text.splitlines()) == 2 + len(jax.tree.leaves(params))


def test_a_dimension_its_mesh_axes_do_not_divide_stays_whole():
  """text8's 27 symbols over tensor=2: the vocab axis is kept whole (with a warning), not an error."""
  config = text8_12l.get_config()
  boxed = _abstract_state(config, 27)
  mesh = AbstractMesh((1, 2, 2), sharding.MESH_AXES)
  shardings = sharding.logical_shardings(boxed, mesh, sharding.logical_rules(config))
  assert tuple(shardings.params["embedding"].spec) == (None, "fsdp")
  assert tuple(shardings.params["head_kernel"].spec) == (None, None, "fsdp", None)
  assert tuple(shardings.params["layers"]["block"]["query"].spec) == (None, "fsdp", "tensor", None)


def test_activation_constraints_hold_wherever_the_step_is_traced(tiny_config):
  """flax's with_logical_constraint does nothing unless the mesh and the rules are in context when
  the step is traced; jit_train_step binds both, so lowering it outside any context keeps them."""
  task = train.make_task(tiny_config, 256)
  mesh, rules = sharding.make_mesh(tiny_config), sharding.logical_rules(tiny_config)
  boxed = _abstract_state(tiny_config, 256)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  windows = jax.ShapeDtypeStruct((8, tiny_config.data.seq_len + 2), jnp.int32)
  text = train.jit_train_step(task, mesh, shardings, rules).lower(
      flax.linen.unbox(boxed), windows, jax.random.key(0), jax.ShapeDtypeStruct((8,), jnp.bool_)).as_text()
  # The residual stream: batch over (data, fsdp), and embed whole because batch took fsdp first;
  # the feed-forward hidden units over tensor.
  constraints = set(re.findall(r"sdy.sharding_constraint %\S+ <@mesh, (\[.*?\])>", text))
  assert '[{"data", "fsdp"}, {}, {}]' in constraints
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in constraints


# --- The sharded train step on 8 simulated devices equals one device ----------------------------

MESHES = ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "(1, 1, 8)"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_matches_one_device(worker, mesh):
  record, reference = worker["meshes"][mesh], worker["reference"]
  assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5)
  assert record["max_param_diff"] < 1e-5  # After 3 updates, momentum and dropout included.


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 2, 2)"])
def test_sharded_xl_step_with_its_memory_matches_one_device(worker, mesh):
  """Transformer-XL on stream batches: the memory (in the state) is split over the batch axes with
  the rows it belongs to, and three steps give one device's losses, parameters and memory."""
  record, reference = worker["xl_meshes"][mesh], worker["xl_reference"]
  assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5)
  assert record["max_param_diff"] < 1e-5 and record["max_memory_diff"] < 1e-4
  assert record["memory_spec"] == [None, ["data", "fsdp"], None, None]  # Rows over the batch axes.
  first, *later = record["per_step"]
  assert all(step == {"compiles": 0, "traces": 0} for step in later)


def test_memory_scheduler_only_where_the_batch_alone_is_split(worker):
  """XLA:CPU's memory-minimizing scheduler (train.memory_scheduled) on one device and on pure data
  parallelism, whose steps above match one device; not where fsdp or tensor split the parameters."""
  scheduled = {mesh: record["memory_scheduled"] for mesh, record in worker["meshes"].items()}
  assert scheduled == {"(8, 1, 1)": True, "(2, 4, 1)": False, "(2, 2, 2)": False, "(1, 1, 8)": False}
  assert worker["reference"]["memory_scheduled"] and worker["xl_meshes"]["(8, 1, 1)"]["memory_scheduled"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_compiles_once(worker, mesh):
  first, *later = worker["meshes"][mesh]["per_step"]
  assert first["compiles"] >= 1
  assert all(step == {"compiles": 0, "traces": 0} for step in later)


@pytest.mark.parametrize("mesh, largest", [
    ("(8, 1, 1)", "head_kernel"),  # Pure data parallelism: every device holds everything.
    ("(2, 4, 1)", "head_bias"),  # The only parameter without an embed (fsdp) axis; tensor is 1.
    ("(2, 2, 2)", None),  # Every parameter has an embed (fsdp) or heads/mlp/vocab (tensor) axis.
    ("(1, 1, 8)", "layers/block/pos_embedding"),  # Norms and positions have no tensor axis.
])
def test_parameters_really_are_sharded(worker, mesh, largest):
  """Read from the device buffers: which parameters a device holds whole, and its share of bytes."""
  record = worker["meshes"][mesh]
  assert (record["largest_replicated"] or [None])[0] == largest
  if largest is not None:
    assert max(record["whole"], key=record["whole"].get) == largest
  total, whole = sum(record["param_bytes"].values()), sum(record["whole"].values())
  shape = [int(n) for n in mesh.strip("()").split(",")]
  sharded_ways = shape[1] * shape[2]
  # Each parameter that is not whole splits over fsdp x tensor, or over one of them (>= 2 ways).
  assert record["device_bytes"] <= whole + (total - whole) / min(sharded_ways, 2)
  if mesh == "(2, 4, 1)":
    assert record["device_bytes"] == whole + (total - whole) / 4


def test_a_single_process_feeds_the_whole_batch(worker):
  assert all(record["slice"] == [0, 1] for record in worker["meshes"].values())


# --- Processes --------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, expected", [
    ({0: {(0, 4)}, 1: {(4, 8)}}, [(0, 2), (1, 2)]),  # data across processes
    ({0: {(0, 8)}, 1: {(0, 8)}}, [(0, 1), (0, 1)]),  # tensor across processes: replicas, same rows
    ({0: {(2, 4), (6, 8)}, 1: {(0, 2), (4, 6)}}, [(1, 2), (0, 2)]),  # interleaved blocks (a torus order)
    ({0: {(0, 2)}, 1: {(0, 2)}, 2: {(2, 4)}, 3: {(2, 4)}}, [(0, 2), (0, 2), (1, 2), (1, 2)]),
])
def test_slice_of_process(rows, expected):
  assert [sharding.slice_of_process(rows, p) for p in sorted(rows)] == expected


def test_processes_holding_overlapping_rows_are_a_user_error():
  with pytest.raises(UserError, match="same batch rows on different sets of processes"):
    sharding.slice_of_process({0: {(0, 2), (2, 4)}, 1: {(2, 4), (4, 6)}}, 0)


def test_flag_args():
  assert distributed.flag_args(None, None, None) is None  # No flags: one process, or a TPU VM.
  assert distributed.flag_args("10.0.0.1:8476", 4, 3) == {
      "coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3}


@pytest.mark.parametrize("args, message", [
    ((None, 2, None), "--coordinator_address, --process_id missing: a multi-process run needs"),
    (("host:1234", None, 0), "--num_processes missing"),
    (("host", 2, 0), "--coordinator_address='host' must be HOST:PORT"),
    (("host:1234", 2, 2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (("host:1234", 0, 0), "--num_processes must be >= 1"),
])
def test_bad_multi_process_flags_are_user_errors(args, message):
  with pytest.raises(UserError, match=message):
    distributed.flag_args(*args)


def test_cli_reports_incomplete_multi_process_flags_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "chartx.main", "--config=configs/tiny.py",
                         f"--workdir={tmp_path}", "--num_processes=2"], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: --coordinator_address, --process_id missing: a multi-process run needs "
      "--coordinator_address, --num_processes and --process_id together"]


def _records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(background):
  """Two jax.distributed processes on localhost, fsdp=2 across them, each feeding half of every
  batch: the same losses as one process; only process 0 prints and writes metrics."""
  tmp, procs = background
  outputs = {name: _finish(procs[name]) for name in ("single", "process0", "process1")}
  single = [r for r in _records(tmp / "single" / "metrics.jsonl") if "loss" in r]
  multi = [r for r in _records(tmp / "multi" / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in single] == [r["step"] for r in multi] == [3, 6]  # Written once each.
  for one, two in zip(single, multi):
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
  assert "bpc" in outputs["process0"][0] + outputs["process0"][1]
  assert "bpc" not in outputs["process1"][0] + outputs["process1"][1]
