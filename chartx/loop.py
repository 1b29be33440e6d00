"""The training loop: restore or initialize, then step, validate, checkpoint and report until done."""

import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from chartx import (data, evaluate, inference, malloc, profiling, report, resume, run_config, sharding,
                    signals, train)
from chartx.families import layers
from chartx.errors import UserError


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train.TrainState:
  """Trains config.train.num_steps steps, resuming from the newest checkpoint in workdir.

  SIGTERM or SIGINT ends the loop after the current step with a checkpoint of it (a second one
  ends the process at once); a NaN or Inf loss ends it with a UserError naming the step, and no
  checkpoint of that state; a write that fails (a full disk) ends it with an errors.WriteFailed
  naming the file, the cause and the newest complete checkpoint.
  """
  ckpts = resume.Checkpoints(workdir, config)  # First: a bad workdir fails before anything slow.
  changes = run_config.resume_changes(config, workdir) if ckpts.manager.all_steps() else None
  if jax.process_index() == 0:
    if changes:
      print(f"train: config changed since the saved run: {changes}", flush=True)
    run_config.save(config, workdir)  # Before training: a run stopped early keeps it too.
  mesh, rules = sharding.check_config(config)
  corpus = data.load_corpus(config.data)
  task = train.make_task(config, corpus.vocab.size)
  seq_len, num_targets = config.data.seq_len, task.model_cfg.num_targets
  family = task.family
  family.check_train_data(len(corpus.train), config)  # Before anything slow.

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  dropout_rng = sharding.replicate_key(dropout_rng, mesh)
  _, shardings, create_state = sharding.sharded_init(
      functools.partial(train.init_state, task, seq_len=seq_len), mesh, rules)
  state = ckpts.restore_or_init(create_state(init_rng))
  start_step = int(state.step)

  step_fn = train.jit_train_step(task, mesh, shardings, rules)
  # The slice of each global batch this process feeds (processes holding replicas share one).
  slice_index, slice_count = sharding.process_slice(mesh, config.train.batch_size)
  eval_ids = evaluate.eval_ids(config, corpus) if config.train.eval_every else None
  proto = family.protocol(config)
  evaluator = evaluate.Evaluator(inference.inference_model(task.model, proto), proto, mesh, rules,
                                 config.eval.batch_size)

  reporter = report.Reporter(config, task, workdir, start_step, layers.count_params(state.params))
  growth = None  # malloc.GrowthWatch of the step's scratch memory, once the step is compiled.
  previous = None  # (step, out) of the newest step not yet finished.
  # The jitted step and score bind the mesh and rules themselves (sharding.MeshJit).
  with (signals.StopSignal(ckpts.manager) as stop_requested, ckpts,
        profiling.StepProfiler(config.train.profile_steps, workdir) as profiler):
    for step in range(start_step, config.train.num_steps):
      with profiler.step(step):
        # The family's batch stream: windows at random positions, or contiguous streams whose
        # memory is in the state (reset_B: the rows whose stream starts over).
        local_BxS, local_B = family.train_batch(corpus.train, config, step, num_targets=num_targets,
                                                process_index=slice_index, process_count=slice_count)
        args = (state, sharding.global_batch(local_BxS, mesh), dropout_rng,
                sharding.global_batch(local_B, mesh))
        if step == start_step:
          step_fn = _compile_step(step_fn, args)
          growth = malloc.GrowthWatch(_scratch_bytes(step_fn))
        state, out = step_fn(*args)
      profiler.done(step, out)
      # Wait for the previous step only now that this one is queued: the device never idles.
      _finish(previous, reporter, ckpts)
      growth.check()
      ckpts.check()  # A failed save ends the run now, not at the next save.
      done = step + 1
      previous = (done, out)
      validation = None
      if config.train.eval_every and (done % config.train.eval_every == 0
                                      or done == config.train.num_steps):
        previous = _finish(previous, reporter, ckpts)  # Its log line comes before the validation.
        with reporter.paused():
          bits, count = evaluator(state.params, eval_ids)
        validation = {f"{config.eval.split}_bpc": bits / count, f"{config.eval.split}_chars": count}
        reporter.validation(done, validation)
      stop = stop_requested(done)
      if ckpts.due(done, validation, stop):
        previous = _finish(previous, reporter, ckpts)  # Never save a step that went non-finite.
        with reporter.paused():
          ckpts.save(done, state, validation)
      if stop:
        ckpts.wait()  # Bounded: a save that fails or hangs ends the run here, in one line.
        if jax.process_index() == 0:
          print(f"train: {stop_requested.received}: stopped after step {done}; "
                f"{ckpts.newest()}", flush=True)
        break
    _finish(previous, reporter, ckpts)
    reporter.close()  # Inside: a signal now must not cut the writers' flush short.
    ckpts.wait()
    stop_requested.finished()  # From here a signal ends the process with status 0.
  return state


def _compile_step(step_fn: sharding.MeshJit, args: tuple[Any, ...]) -> Any:
  """The train step compiled for args (the first step's) before it runs, then the compiler's freed
  scratch memory returned to the kernel (malloc.release_freed_memory): compiled by the step's
  first call instead, it stayed resident beside the step's own scratch memory."""
  compiled = step_fn.lower(*args).compile()
  malloc.release_freed_memory()
  return compiled


def _scratch_bytes(compiled: Any) -> int:
  """The compiled step's scratch (temp) memory per device, 0 where the backend does not say."""
  stats = compiled.memory_analysis()
  return 0 if stats is None else int(stats.temp_size_in_bytes)


def _finish(previous: tuple[int, dict[str, jax.Array]] | None, reporter: report.Reporter,
            ckpts: resume.Checkpoints) -> None:
  """Finishes step `previous` (if any): waits for it, a UserError if its loss or gradient norm is
  NaN or Inf (then so is its state), else its report. Returns None, what `previous` becomes."""
  if previous is None:
    return
  step, out = previous
  loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    raise UserError(f"the loss is {loss} (gradient norm {grad_norm}) at step {step}; stopping: "
                    f"{ckpts.newest()}")
  reporter.step_done(step, out)

