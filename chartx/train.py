"""TrainState, the pure train step, and the training loop."""

import contextlib
import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from chartx import checkpoint, data, evaluate, losses, metrics, sharding
from chartx import model as model_lib
from chartx import optimizer as optimizer_lib
from chartx.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: the step the next update will be.
  params: Any
  opt_state: Any
  # w_LxK, the auxiliary-loss weights for `step`. A pure function of the step, kept in the state
  # (and so in checkpoints) so a restored run continues the schedule and can be inspected.
  loss_weights: jax.Array


@dataclasses.dataclass(frozen=True)
class Task:
  """The static pieces of a run that the jitted functions close over."""
  model: model_lib.Transformer
  loss_cfg: losses.LossConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule

  @property
  def model_cfg(self) -> model_lib.ModelConfig:
    return self.model.cfg


def make_task(config: ml_collections.ConfigDict, vocab_size: int) -> Task:
  model_cfg = model_lib.ModelConfig.from_config(config, vocab_size)
  for key in ("num_steps", "batch_size", "log_every"):
    if config.train[key] < 1:
      raise UserError(f"config.train.{key} must be >= 1, got {config.train[key]}")
  return Task(model=model_lib.Transformer(model_cfg, deterministic=False, all_layers=True),
              loss_cfg=losses.LossConfig.from_config(config),
              tx=optimizer_lib.make_optimizer(config),
              schedule=optimizer_lib.learning_rate_schedule(config.optimizer, config.train.num_steps))


def init_state(task: Task, rng: jax.Array, seq_len: int) -> TrainState:
  """A fresh state; its params are nn.Partitioned-boxed with logical axis names."""
  tokens_1xT = jnp.zeros((1, seq_len), jnp.int32)
  params = task.model.clone(deterministic=True, all_layers=False).init(rng, tokens_1xT)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=task.tx.init(params),
                    loss_weights=losses.loss_weights(jnp.zeros((), jnp.int32), task.loss_cfg))


def create_train_state(task: Task, rng: jax.Array, seq_len: int, mesh: jax.sharding.Mesh,
                       rules: tuple) -> tuple[TrainState, TrainState]:
  """(state, shardings): the state created already sharded over the mesh, never whole on one device."""
  init = functools.partial(init_state, task, seq_len=seq_len)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  boxed = sharding.jit_sharded(init, mesh, rules, in_shardings=sharding.replicated(mesh),
                               out_shardings=shardings)(rng)
  return flax.linen.unbox(boxed), shardings


def compute_loss(task: Task, params: Any, windows_BxS: jax.Array, weights_LxK: jax.Array,
                 rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(total loss, nll_LxK). Without intermediate layers only the last layer runs its heads (L=1)."""
  cfg, loss_cfg = task.model_cfg, task.loss_cfg
  seq_len = windows_BxS.shape[1] - cfg.num_targets
  inputs_BxT = windows_BxS[:, :seq_len]
  targets_KxBxT = losses.targets(windows_BxS, seq_len, cfg.num_targets)
  variables = {"params": params}
  rngs = {} if rng is None else {"dropout": rng}
  all_layers = loss_cfg.intermediate_layers
  net = task.model.clone(deterministic=rng is None, all_layers=all_layers)
  h = net.apply(variables, inputs_BxT, rngs=rngs)
  heads = task.model.apply(variables, method=model_lib.Transformer.heads)
  if not all_layers:
    h, weights_LxK = h[None], weights_LxK[-1:]
    heads = {k: (v if k == "embedding" else v[-1:]) for k, v in heads.items()}
  nll_LxK = losses.layer_nlls(cfg, heads, h, targets_KxBxT, loss_cfg.multiple_positions)
  return (weights_LxK * nll_LxK).sum(), nll_LxK


def train_step(task: Task, state: TrainState, windows_BxS: jax.Array,
               rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update. Pure: the dropout key is rng folded with the step, so a step is reproducible."""
  dropout_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(compute_loss, argnums=1, has_aux=True)
  (loss, nll_LxK), grads = grad_fn(task, state.params, windows_BxS, state.loss_weights, dropout_rng)
  updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  next_step = state.step + 1
  out = {"loss": loss, "bpc": losses.bits(nll_LxK[-1, 0]), "nll": nll_LxK,
         "loss_weights": state.loss_weights, "grad_norm": optax.tree.norm(grads),
         "learning_rate": task.schedule(state.step)}
  return TrainState(step=next_step, params=params, opt_state=opt_state,
                    loss_weights=losses.loss_weights(next_step, task.loss_cfg)), out


def flatten_metrics(out: dict[str, np.ndarray], loss_cfg: losses.LossConfig) -> dict[str, float]:
  """Named scalars for the logs: loss/layer_L, loss/layer_L_ahead_K, weight/layer_L, ..."""
  nll_LxK, w_LxK = np.asarray(out["nll"]), np.asarray(out["loss_weights"])
  scalars = {k: float(v) for k, v in out.items() if k not in ("nll", "loss_weights")}
  first = loss_cfg.num_layers - nll_LxK.shape[0] + 1  # Only the last layer has nlls when L=1.
  for i, layer in enumerate(range(first, loss_cfg.num_layers + 1)):
    for k in range(nll_LxK.shape[1]):
      suffix = f"layer_{layer}" + (f"_ahead_{k + 1}" if k else "")
      scalars[f"loss/{suffix}"] = float(nll_LxK[i, k])
  for layer in range(1, loss_cfg.num_layers + 1):
    scalars[f"weight/layer_{layer}"] = float(w_LxK[layer - 1, 0])
  for k in range(1, w_LxK.shape[1]):
    scalars[f"weight/ahead_{k + 1}"] = float(w_LxK[-1, k])
  return scalars


def jit_train_step(task: Task, mesh: jax.sharding.Mesh, shardings: TrainState,
                   rules: sharding.Rules | None = None) -> sharding.MeshJit:
  """The train step compiled once, with explicit shardings and the old state's buffers donated.

  It is traced under the mesh and `rules` (None: the logical-axis rules in context now), which
  the activations' sharding constraints need.
  """
  rules = flax.linen.get_logical_axis_rules() if rules is None else rules
  return sharding.jit_sharded(
      functools.partial(train_step, task), mesh, rules,
      in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def validation_bpc(score: evaluate.ScoreFn, params: Any, ids_N: np.ndarray,
                   config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Strided bpc on ids_N (evaluate.eval_ids) as the eval.* keys say, for the training logs."""
  bits, count = evaluate.evaluate_bits(score, params, ids_N, seq_len=config.data.seq_len,
                                       stride=config.eval.stride, batch_size=config.eval.batch_size,
                                       mesh=mesh)
  return {f"{config.eval.split}_bpc": bits / count, f"{config.eval.split}_chars": count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains config.train.num_steps steps, resuming from the newest checkpoint in workdir.

  SIGTERM or SIGINT ends the loop after the current step with a checkpoint of it; a NaN or Inf
  loss ends it with a UserError naming the step, and no checkpoint of that state.
  """
  ckpts = checkpoint.Checkpoints(workdir, config)  # First: a bad workdir fails before anything slow.
  corpus = data.load_corpus(config.data)
  task = make_task(config, corpus.vocab.size)
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_rules(config)
  sharding.check_batch(config.train.batch_size, mesh, "config.train.batch_size")
  if config.train.eval_every:
    evaluate.check_eval_config(config, mesh)
  seq_len, num_targets = config.data.seq_len, task.model_cfg.num_targets

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state, shardings = create_train_state(task, init_rng, seq_len, mesh, rules)
  state = ckpts.restore_or_init(state)
  start_step = int(state.step)

  step_fn = jit_train_step(task, mesh, shardings, rules)
  # The slice of each global batch this process feeds (processes holding replicas share one).
  slice_index, slice_count = sharding.process_slice(mesh, config.train.batch_size)
  eval_ids = evaluate.eval_ids(config, corpus) if config.train.eval_every else None
  score = evaluate.jit_score_fn(evaluate.model_score_fn(task.model), mesh, rules)

  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0, start_step=start_step)
  report = _Reporter(config, task, writer, start_step, model_lib.count_params(state.params))
  pending = None
  unchecked = None  # (step, out) of the newest step whose loss is not yet known to be finite.
  # The jitted step and score bind the mesh and rules themselves (sharding.jit_sharded).
  with checkpoint.StopSignal(ckpts.manager) as stop_requested, ckpts:
    for step in range(start_step, config.train.num_steps):
      local_BxS = data.train_batch(corpus.train, seed=config.seed, step=step,
                                   batch_size=config.train.batch_size, length=seq_len + num_targets,
                                   process_index=slice_index, process_count=slice_count)
      state, out = step_fn(state, sharding.global_batch(local_BxS, mesh), dropout_rng)
      # Wait for the previous step (and read its metrics) only now that this one is queued.
      if unchecked is not None:
        _check_finite(*unchecked, ckpts)
      if pending is not None:
        report.step_done(*pending)
      done = step + 1
      pending = unchecked = (done, out)
      validation = None
      if config.train.eval_every and (done % config.train.eval_every == 0
                                      or done == config.train.num_steps):
        report.step_done(*pending)  # Its log line comes before the validation result.
        pending = None
        with report.paused():
          result = validation_bpc(score, state.params, eval_ids, config, mesh)
        report.validation(done, result)
        validation = result
      stop = stop_requested(done)
      if ckpts.due(done, validation, stop):
        _check_finite(*unchecked, ckpts)  # Never save the state of a step that went non-finite.
        unchecked = None
        with report.paused():
          ckpts.save(done, state, validation)
      if stop:
        if jax.process_index() == 0:
          print(f"train: {stop_requested.received}: stopped after step {done}; "
                f"{ckpts.newest()}", flush=True)
        break
    if unchecked is not None:
      _check_finite(*unchecked, ckpts)
    if pending is not None:
      report.step_done(*pending)
  report.close()
  return state


def _check_finite(step: int, out: dict[str, jax.Array], ckpts: checkpoint.Checkpoints) -> None:
  """UserError if step `step`'s loss or gradient norm is NaN or Inf (then so is the next state)."""
  loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    raise UserError(f"the loss is {loss} (gradient norm {grad_norm}) at step {step}; stopping: "
                    f"{ckpts.newest()}")


class _Reporter:
  """What the loop tells the user: a progress bar or lines, metric records, throughput and MFU.

  chars/s is measured between log steps from when each step's results are ready, leaving out
  the first step (compilation) and validation; mfu needs a known peak (metrics.peak_flops).
  """

  def __init__(self, config: ml_collections.ConfigDict, task: Task, writer: metrics.MetricWriter,
               start_step: int, num_params: int):
    self._writer, self._loss_cfg, self._split = writer, task.loss_cfg, config.eval.split
    self._log_every, self._num_steps, self._start_step = (config.train.log_every,
                                                          config.train.num_steps, start_step)
    seq_len = config.data.seq_len
    self._chars_per_step = config.train.batch_size * seq_len
    flops_per_char = metrics.flops_per_char(task.model_cfg, seq_len, task.loss_cfg.intermediate_layers)
    self._flops_per_step = flops_per_char * self._chars_per_step
    device = jax.devices()[0]
    peak = metrics.peak_flops(device)
    self._peak = peak * jax.device_count() if peak else None
    self._mark_step, self._mark_time = start_step, time.perf_counter()
    self._last: dict[str, float] = {}
    self._progress = metrics.Progress(self._num_steps, "train", unit="step", initial=start_step,
                                      every_secs=60.0, enabled=writer.enabled)
    cfg = task.model_cfg
    peak_text = (f"{metrics.format_number(peak)} FLOP/s bf16 peak each" if peak
                 else "no known peak, so no MFU")
    count = jax.device_count()
    self._progress.write(
        f"train: {num_params:,} parameters ({cfg.num_layers} layers, d_model {cfg.d_model}), "
        f"{metrics.format_number(flops_per_char)} FLOPs/char; {config.train.batch_size} x {seq_len} "
        f"chars a step; {count} {device.device_kind} device{'s' if count > 1 else ''} ({peak_text})")
    if start_step >= self._num_steps:
      self._progress.write(f"train: already at step {start_step} of {self._num_steps}; nothing to do")
    elif start_step:
      self._progress.write(f"train: resuming at step {start_step} of {self._num_steps}")

  def step_done(self, step: int, out: dict) -> None:
    """Called in step order once step `step` is queued after it; waits for its results."""
    jax.block_until_ready(out)
    self._progress.update(1)
    if step % self._log_every == 0 or step == self._num_steps:
      self._log(step, out)
    elif step == self._start_step + 1:
      self._mark_step, self._mark_time = step, time.perf_counter()  # Leave out compilation.

  def _log(self, step: int, out: dict) -> None:
    scalars = flatten_metrics(jax.device_get(out), self._loss_cfg)  # Finite: the loop checked.
    now = time.perf_counter()
    steps_per_sec = (step - self._mark_step) / max(now - self._mark_time, 1e-9)
    self._mark_step, self._mark_time = step, now
    scalars["chars_per_sec"] = steps_per_sec * self._chars_per_step
    postfix = {"bpc": f"{scalars['bpc']:.4f}", "chars/s": metrics.format_number(scalars["chars_per_sec"])}
    if self._peak:
      scalars["mfu"] = steps_per_sec * self._flops_per_step / self._peak
      postfix["mfu"] = f"{100 * scalars['mfu']:.1f}%"
    postfix["loss"] = f"{scalars['loss']:.4f}"  # Last: a narrow terminal cuts the bar's end.
    self._writer.write(step, scalars)
    self._last.update(bpc=scalars["bpc"])
    self._progress.update(0, line=True, **postfix)

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside does not count against training throughput."""
    start = time.perf_counter()
    yield
    self._mark_time += time.perf_counter() - start

  def validation(self, step: int, result: dict[str, float]) -> None:
    self._writer.write(step, result)
    bpc, chars = result[f"{self._split}_bpc"], result[f"{self._split}_chars"]
    self._last[f"{self._split} bpc"] = bpc
    self._progress.write(f"step {step}  {self._split} bpc {bpc:.4f}  ({chars:,} chars)")

  def close(self) -> None:
    if self._last:
      summary = ", ".join(f"{k} {v:.4f}" for k, v in self._last.items())
      self._progress.write(f"train: step {self._progress.n}: {summary}")
    self._progress.close()
    self._writer.close()
