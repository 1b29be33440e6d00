"""Weights & Biases, beside TensorBoard and metrics.jsonl: log.wandb_project turns it on.

wandb is imported only then (pip install 'chartx[wandb]'), and only process 0 writes. The W&B run
id is kept in WORKDIR/wandb_run_id, so a resumed training run continues the same W&B run; the
run's config is logged with it. W&B's own settings apply: WANDB_MODE=offline writes the run to
disk for a later `wandb sync`, WANDB_API_KEY or `wandb login` authenticates.
"""

import importlib.util
import os
import re
import uuid
from typing import Any, Mapping

import ml_collections

from chartx import errors, files
from chartx.errors import UserError

RUN_ID_FILE = "wandb_run_id"


def check_config(config: ml_collections.ConfigDict) -> None:
  """The log section's owner: log.wandb_project and log.wandb_entity, UserError naming a bad one."""
  for key in ("wandb_project", "wandb_entity"):
    value = config.log[key]
    if re.search(r"[/\\#?%:\s]", value):
      raise UserError(f"config.log.{key}={value!r}: W&B names cannot hold /, \\, #, ?, %, : or spaces")
  if config.log.wandb_entity and not config.log.wandb_project:
    raise UserError("config.log.wandb_entity is set but config.log.wandb_project is not")
  if config.log.wandb_project and importlib.util.find_spec("wandb") is None:
    raise UserError("config.log.wandb_project needs wandb: pip install 'chartx[wandb]'")


class WandbWriter:
  """A W&B run for the training run in workdir (create with open_writer)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    import wandb  # pylint: disable=import-outside-toplevel  (only when asked: it is slow to import)
    id_path = os.path.join(workdir, RUN_ID_FILE)
    run_id = (files.read_text(id_path) or "").strip()
    if not run_id:
      run_id = uuid.uuid4().hex[:12]
      files.write_text(id_path, run_id + "\n")
    # W&B keeps its local files in a directory; a gs:// workdir leaves them in the current one.
    local = None if files.is_remote(workdir) else os.path.abspath(workdir)
    self._run = wandb.init(project=config.log.wandb_project, entity=config.log.wandb_entity or None,
                           id=run_id, resume="allow", config=config.to_dict(), dir=local,
                           name=os.path.basename(workdir.rstrip("/")))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    try:
      self._run.log(dict(scalars), step=int(step))
    except OSError as e:  # W&B writes its run files locally first, wherever it syncs them.
      raise errors.write_failed(f"the W&B run in {self._run.dir}", e) from e

  def close(self) -> None:
    self._run.finish()


def open_writer(config: ml_collections.ConfigDict, workdir: str, enabled: bool) -> WandbWriter | None:
  """A WandbWriter if log.wandb_project is set and this process writes (process 0), else None."""
  return WandbWriter(config, workdir) if enabled and config.log.wandb_project else None
