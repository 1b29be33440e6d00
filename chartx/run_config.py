"""The config a run trained with travels with it: WORKDIR/config.json (every key, overrides
applied, written when training starts) and each checkpoint's Orbax metadata (so a copied
checkpoint directory keeps it).

--mode=eval and --mode=sample read it when --config is not given (main passes this file to
config_flags as --config=<this file>:WORKDIR, so --config.KEY=VALUE overrides it for that run
as they would a config file). A given --config is compared with it instead: a model or data key
that differs is an error, since it would restore a different model or score other text. A
resumed training run says which keys changed and refuses those a checkpoint cannot follow.
"""

import importlib.util
import json
import os
import re
from typing import Any

import ml_collections

from chartx import files
from chartx.families import registry
from chartx.errors import UserError

CONFIG_FILE = "config.json"
# Every key's default: a run saved before a key existed trained with its default.
_DEFAULTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                              "default.py")
# What a checkpoint is: its parameters' shapes and the text it learned. Resuming cannot change them.
FIXED_ON_RESUME = ("model.family", "model.num_layers", "model.d_model", "model.num_heads", "model.d_ff",
                   "model.tie_embeddings", "model.scan_layers", "loss.multiple_targets", "data.name")
# A family's checkpoints may fix more (chartx.families.base.Family.fixed_on_resume).
# model.* keys that say how the model is computed, not what it is: inference may use others
# (bfloat16 or cuDNN attention on a GPU for a model trained elsewhere; dropout is off anyway).
_COMPUTE_KEYS = ("model.dtype", "model.attention", "model.remat", "model.dropout")


def find_key(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str] | None:
  """(the ConfigDict that holds dotted `key`, its last part), or None where the key does not exist."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      return None
    node = node[part]
  return (node, leaf) if leaf in node else None


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"


def _defaults() -> ml_collections.ConfigDict:
  """configs/default.py's config, where chartx runs from its checkout (else an empty one)."""
  if not os.path.exists(_DEFAULTS_FILE):
    return ml_collections.ConfigDict()
  spec = importlib.util.spec_from_file_location("chartx_default_config", _DEFAULTS_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """The config of saved values: configs/default.py's, with every saved value set on it. A key
  added to chartx after the run was saved keeps its default (what that run did); JSON's lists
  become the tuples configs hold (mesh.*)."""
  def tuples(value):
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

  def merge(config, saved):
    for key, value in saved.items():
      if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
        merge(config[key], value)
      else:
        config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else tuples(value)

  config = _defaults()
  model = values.get("model", {})
  if "per_layer_positions" in model:  # Saved before model.positions replaced it.
    model = {**model, "positions": "per_layer" if model["per_layer_positions"] else "input"}
    values = {**values, "model": {k: v for k, v in model.items() if k != "per_layer_positions"}}
  merge(config, values)
  return config


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json (call it on process 0)."""
  files.write_text(os.path.join(workdir, CONFIG_FILE), to_json(config))


def load(workdir: str) -> ml_collections.ConfigDict | None:
  """The run's saved config: WORKDIR/config.json, else the newest checkpoint's metadata, else None."""
  text = files.read_text(os.path.join(workdir, CONFIG_FILE))
  if text is not None:
    try:
      return from_dict(json.loads(text))
    except json.JSONDecodeError as e:
      raise UserError(f"{os.path.join(workdir, CONFIG_FILE)} is not JSON: {e}") from None
  from chartx import checkpoint  # pylint: disable=import-outside-toplevel  (Orbax and JAX: slow)
  values = checkpoint.saved_config(workdir)
  return None if values is None else from_dict(values)


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """config_flags' entry (--config=<this file>:WORKDIR): the saved config, or a UserError."""
  config = load(workdir)
  if config is None:
    raise UserError(f"--config is not given and {workdir} has no saved config ({CONFIG_FILE}, or "
                    "a checkpoint that holds one): pass the --config it was trained with")
  return config


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --NAME in argv (--NAME=V or --NAME V, one dash or two), as absl reads it."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    match = re.fullmatch(rf"--?{name}(=(.*))?", arg)
    if match:
      value = match[2] if match[1] else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def config_argv(argv: list[str]) -> list[str]:
  """argv with --config=<this file>:WORKDIR first when --mode=eval or sample has no --config."""
  workdir = _flag_value(argv, "workdir")
  if (_flag_value(argv, "config") is not None or workdir is None
      or _flag_value(argv, "mode") not in ("eval", "sample")):
    return argv
  return [argv[0], f"--config={os.path.abspath(__file__)}:{workdir}", *argv[1:]]


def is_saved(config_filename: str) -> bool:
  """Whether config_flags loaded the config from this file (the saved config), not a --config."""
  return config_filename.split(":", 1)[0] == os.path.abspath(__file__)


def differences(saved: ml_collections.ConfigDict,
                config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, value)} for every dotted key whose values differ (or one lacks)."""
  flat_saved, flat = _flatten(saved.to_dict()), _flatten(config.to_dict())
  return {key: (flat_saved.get(key), flat.get(key)) for key in sorted(flat_saved.keys() | flat.keys())
          if _jsonable(flat_saved.get(key)) != _jsonable(flat.get(key))}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _jsonable(value: Any) -> Any:
  """Tuples and lists compare equal, as JSON holds both as lists."""
  return json.loads(json.dumps(value))


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def check_given(config: ml_collections.ConfigDict, workdir: str) -> None:
  """--mode=eval/sample with a --config: UserError naming the model.* and data.* keys (those that
  say what the model is and what it reads) that differ from the run's saved config, if any."""
  saved = load(workdir)
  if saved is None:
    return  # A run from before configs were saved: the checkpoint's shapes are the only check.
  changed = {key: change for key, change in differences(saved, config).items()
             if key.startswith(("model.", "data.")) and key not in _COMPUTE_KEYS}
  if changed:
    raise UserError(f"--config differs from the config {workdir} was trained with: "
                    f"{_describe(changed)} (leave out --config to use the saved one; "
                    "--config.KEY=VALUE still overrides it)")


def resume_changes(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """A training run about to resume: the keys changed since the saved config, as text (None if
  none); UserError for those in FIXED_ON_RESUME."""
  saved = load(workdir)
  if saved is None:
    return None
  changes = differences(saved, config)
  keys = FIXED_ON_RESUME + registry.get(saved.model.get("family", "fixed")).fixed_on_resume
  fixed = {key: change for key, change in changes.items() if key in keys}
  if fixed:
    raise UserError(f"{_describe(fixed)}: a resumed run cannot change what its checkpoints hold; "
                    "train into a new --workdir")
  return _describe(changes) if changes else None
