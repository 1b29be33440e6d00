"""What the training loop tells the user: progress, metric records, throughput and MFU."""

import contextlib
import time

import jax
import ml_collections
import numpy as np

from chartx import flops, losses, metrics, progress, train, wandb_writer


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


class Reporter:
  """The run's progress bar or lines, metric records, throughput and MFU. chars/s is measured
  between log steps from when each step's results are ready, leaving out the first step
  (compilation) and validation; mfu needs a known peak (flops.peak_flops)."""

  def __init__(self, config: ml_collections.ConfigDict, task: train.Task, workdir: str,
               start_step: int, num_params: int):
    # Process 0 alone writes records and prints.
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0, start_step=start_step)
    self._writer, self._loss_cfg, self._split = writer, task.loss_cfg, config.eval.split
    self._wandb = wandb_writer.open_writer(config, workdir, writer.enabled)  # None unless asked.
    self._log_every, self._num_steps, self._start_step = (config.train.log_every,
                                                          config.train.num_steps, start_step)
    seq_len = config.data.seq_len
    self._chars_per_step = config.train.batch_size * seq_len
    self._flops_per_char = task.family.flops_per_char(task.model_cfg, seq_len,
                                                      task.loss_cfg.intermediate_layers,
                                                      batch_size=config.train.batch_size)
    device = jax.devices()[0]
    peak = flops.peak_flops(device)
    self._mark_step, self._mark_time = start_step, time.perf_counter()
    self._last: dict[str, float] = {}
    self._progress = progress.Progress(self._num_steps, "train", unit="step", initial=start_step,
                                      every_secs=60.0, enabled=writer.enabled)
    cfg = task.model_cfg
    peak_text = (f"{progress.format_number(peak)} FLOP/s bf16 peak each" if peak
                 else "no known peak, so no MFU")
    count = jax.device_count()
    self._progress.write(
        f"train: {num_params:,} parameters ({cfg.num_layers} layers, d_model {cfg.d_model}), "
        f"{progress.format_number(self._flops_per_char)} FLOPs/char; "
        f"{config.train.batch_size} x {seq_len} chars a step; "
        f"{count} {device.device_kind} device{'s' if count > 1 else ''} ({peak_text})")
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
    postfix = {"bpc": f"{scalars['bpc']:.4f}", "chars/s": progress.format_number(scalars["chars_per_sec"])}
    mfu = flops.mfu(self._flops_per_char * scalars["chars_per_sec"], jax.devices())
    if mfu is not None:
      scalars["mfu"] = mfu
      postfix["mfu"] = f"{100 * mfu:.1f}%"
    postfix["loss"] = f"{scalars['loss']:.4f}"  # Last: a narrow terminal cuts the bar's end.
    self._write(step, scalars)
    self._last.update(bpc=scalars["bpc"])
    self._progress.update(0, line=True, **postfix)

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside does not count against training throughput."""
    start = time.perf_counter()
    yield
    self._mark_time += time.perf_counter() - start

  def _write(self, step: int, scalars: dict[str, float]) -> None:
    self._writer.write(step, scalars)
    if self._wandb:
      self._wandb.write(step, scalars)

  def validation(self, step: int, result: dict[str, float]) -> None:
    self._write(step, result)
    bpc, chars = result[f"{self._split}_bpc"], result[f"{self._split}_chars"]
    self._last[f"{self._split} bpc"] = bpc
    self._progress.write(f"step {step}  {self._split} bpc {bpc:.4f}  ({chars:,} chars)")

  def close(self) -> None:
    if self._last:
      summary = ", ".join(f"{k} {v:.4f}" for k, v in self._last.items())
      self._progress.write(f"train: step {self._progress.n}: {summary}")
    self._progress.close()
    self._writer.close()
    if self._wandb:
      self._wandb.close()
