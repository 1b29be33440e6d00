"""The sharded train step on 8 simulated CPU devices, against one device; run by test_sharding.py.

    python tests/sharding_worker.py OUT.json

XLA_FLAGS must be set before JAX is imported, so this runs as its own process. For each mesh
(and, for Transformer-XL on stream batches, each of XL_MESHES) it records the losses of three steps, the largest difference of the updated parameters from the
one-device run, which parameters every device holds whole (from the device buffers), and how
many compilations each step caused; then it checks that bad configs fail before compiling.
"""

import contextlib
import functools
import json
import os
import sys
import tempfile

# Eight CPU devices; LLVM's optimizations off halves the compile time (it is the test's cost).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from chartx import data, loop, sharding, train  # noqa: E402
from chartx.tools import layout  # noqa: E402
from chartx.errors import UserError  # noqa: E402
from configs import tiny  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
XL_MESHES = [(8, 1, 1), (2, 2, 2)]  # Transformer-XL: its memory's rows split with the batch's.
VOCAB = 256
NUM_STEPS = 3


def config():
  c = tiny.get_config()
  # Every axis the rules shard divides by 8: d_model (embed), heads, d_ff (mlp), vocab 256.
  c.model.d_model, c.model.num_heads, c.model.d_ff = 64, 8, 128
  c.model.dropout = 0.1  # The dropout masks must not depend on the sharding either.
  c.train.batch_size = 8
  return c


@contextlib.contextmanager
def count_compiles():
  """Counts XLA compilations and jaxpr traces inside the block: {'compiles': n, 'traces': m}."""
  counts = {"compiles": 0, "traces": 0}
  def listener(event, _duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      counts["compiles"] += 1
    elif event == "/jax/core/compile/jaxpr_trace_duration":
      counts["traces"] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def xl_config():
  """config() as a Transformer-XL with a memory of 16."""
  c = config()
  c.model.family, c.model.mem_len = "xl", 16
  return c


def run(c, devices, windows_steps_BxS, resets_steps_B=None):
  """Trains NUM_STEPS steps on `devices` with c.mesh.shape (XL: with each step's resets); returns
  (record, params as numpy, the memory as numpy or None)."""
  mesh = sharding.make_mesh(c, devices)
  rules = sharding.logical_rules(c)
  task = train.make_task(c, VOCAB)
  _, shardings, create = sharding.sharded_init(
      functools.partial(train.init_state, task, seq_len=c.data.seq_len), mesh, rules)
  state = create(jax.random.key(0))
  step_fn = train.jit_train_step(task, mesh, shardings, rules)
  dropout_rng = jax.random.key(1)
  index, count = sharding.process_slice(mesh, c.train.batch_size)
  rows = c.train.batch_size // count
  losses, per_step = [], []
  for s, windows_BxS in enumerate(windows_steps_BxS):
    with count_compiles() as counts:
      mine = slice(index * rows, (index + 1) * rows)
      resets_B = (np.zeros(len(windows_BxS), bool) if resets_steps_B is None else resets_steps_B[s])
      batch = sharding.global_batch(windows_BxS[mine], mesh)
      state, out = step_fn(state, batch, dropout_rng, sharding.global_batch(resets_B[mine], mesh))
      losses.append(float(out["loss"]))
    per_step.append(counts)
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
  whole = {name: x.nbytes for name, (_, x) in zip(names, leaves)
           if x.addressable_shards[0].data.shape == x.shape}
  record = {
      "losses": losses, "per_step": per_step, "slice": [index, count],
      "param_bytes": {name: x.nbytes for name, (_, x) in zip(names, leaves)},
      "device_bytes": sum(x.addressable_shards[0].data.nbytes for _, x in leaves),
      "whole": whole,
      "largest_replicated": layout.largest_replicated(state.params, shardings.params),
      "describe": layout.describe(state.params, shardings.params),
      "memory_scheduled": train.memory_scheduled(mesh),
  }
  memory = None if state.memory is None else np.asarray(state.memory.h_LxBxMxD)
  if memory is not None:
    record["memory_spec"] = list(state.memory.h_LxBxMxD.sharding.spec)
  return record, {name: np.asarray(x) for name, (_, x) in zip(names, leaves)}, memory


def error_before_compiling(c, workdir):
  """(message, compilations) of train_and_evaluate on a bad config."""
  with count_compiles() as counts:
    try:
      loop.train_and_evaluate(c, workdir)
    except UserError as e:
      return str(e), counts["compiles"]
  return None, counts["compiles"]


def main(out_path):
  assert jax.device_count() == 8, jax.devices()
  c = config()
  length = c.data.seq_len + c.loss.multiple_targets
  windows_steps_BxS = np.random.default_rng(0).integers(
      0, VOCAB, (NUM_STEPS, c.train.batch_size, length), dtype=np.int32)
  c.mesh.shape = (1, 1, 1)
  reference, ref_params, _ = run(c, jax.devices()[:1], windows_steps_BxS)
  result = {"reference": reference, "meshes": {}, "xl_meshes": {}}
  for shape in MESHES:
    c.mesh.shape = shape
    record, params, _ = run(c, jax.devices(), windows_steps_BxS)
    record["max_param_diff"] = max(float(np.abs(params[k] - ref_params[k]).max()) for k in params)
    result["meshes"][str(shape)] = record

  # Transformer-XL on stream batches: the memory carries each row's stream from step to step.
  c = xl_config()
  ids_M = np.random.default_rng(1).integers(0, VOCAB, 2000).astype(np.int32)
  streams = [data.stream_batch(ids_M, step=s, batch_size=c.train.batch_size, seq_len=c.data.seq_len,
                               num_targets=c.loss.multiple_targets) for s in range(NUM_STEPS)]
  windows_steps_BxS, resets_steps_B = [w for w, _ in streams], [r for _, r in streams]
  c.mesh.shape = (1, 1, 1)
  result["xl_reference"], ref_params, ref_memory = run(c, jax.devices()[:1], windows_steps_BxS, resets_steps_B)
  for shape in XL_MESHES:
    c.mesh.shape = shape
    record, params, memory = run(c, jax.devices(), windows_steps_BxS, resets_steps_B)
    record["max_param_diff"] = max(float(np.abs(params[k] - ref_params[k]).max()) for k in params)
    record["max_memory_diff"] = float(np.abs(memory - ref_memory).max())
    result["xl_meshes"][str(shape)] = record

  with tempfile.TemporaryDirectory() as tmp:
    text = os.path.join(tmp, "text.txt")
    with open(text, "w", encoding="utf-8") as f:
      f.write("a small corpus of characters to train on " * 200)
    bad = config()
    bad.data.path = text
    bad.mesh.shape = (3, 1, 1)
    result["mesh_error"] = error_before_compiling(bad, os.path.join(tmp, "mesh"))
    bad.mesh.shape = (8, 1, 1)
    bad.train.batch_size = 12
    result["batch_error"] = error_before_compiling(bad, os.path.join(tmp, "batch"))
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
