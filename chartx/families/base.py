"""The family interface: everything that differs between model families, behind one class (Family),
and the two evaluation protocols a family can choose (SlidingWindow, Recurrent).

The run's stages (the loss, the train step, the loop, evaluation, sampling, checkpoints,
chartx.load) call a Family and never name one; chartx.families.registry finds the family of
config.model.family. A family is a Family subclass whose instance is registered under its name:

  build          its Flax module; module(tokens_BxT) -> h (fixed), or (h, memory) with a memory.
  init_memory    the extra train state it carries from step to step (None: none), boxed with
                 logical axis names; reset_memory empties the rows whose stream starts over;
                 inference_memory: the memory its recurrent evaluation carries (default: the same).
  apply          one forward pass, memory in and out, as the loss runs it.
  train_batch    its batch stream: (windows_BxS, reset_B) of a step.
  protocol       its evaluation protocol, with the eval.* keys resolved.
  decoder        its decoding state and step (the fixed model's KV cache, XL's memory).
  check_config   its model.* keys, and data.seq_len where its modules bound it; fixed_on_resume:
                 the config keys its checkpoints fix.
  flops_per_char its training FLOPs per character.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chartx import data, scoring, sharding
from chartx.errors import UserError
from chartx.families.layers import ModelConfig

SAME_LENGTH = ("auto", "true", "false")  # eval.same_length; auto: model.same_length.


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a split is scored: the eval.* keys resolved for the model's family. The subclasses
  carry the behaviour; `name` is what eval_<split>.json reports as "protocol"."""
  name = ""
  seq_len: int  # T: the window (sliding_window) or each segment (recurrent).
  stride: int  # Characters each forward pass scores: the stride, or T (a segment is scored whole).

  def attention_length(self, num_chars: int, batch_size: int) -> int:
    """The most characters any scored character of a text of num_chars could see (the input
    position before it included)."""
    raise NotImplementedError

  def min_context(self, attention_length: int) -> int:
    """The characters each scored one sees at least (past the start of the text or a stream)."""
    raise NotImplementedError

  def describe(self, num_chars: int, batch_size: int) -> dict[str, Any]:
    """The protocol's fields in eval_<split>.json, for a text of num_chars in batches of batch_size."""
    return {"protocol": self.name, "attention_length": self.attention_length(num_chars, batch_size),
            "stride": self.stride}

  def how(self, result: dict[str, Any]) -> str:
    """How an eval_<split>.json result was scored, for its line on stdout."""
    raise NotImplementedError

  def inference_cfg(self, cfg: ModelConfig) -> ModelConfig:
    """The model's config as evaluation and sampling run it (the same parameters serve it)."""
    return cfg

  def scorer(self, family: "Family", model: Any, mesh: jax.sharding.Mesh, rules: sharding.Rules,
             batch_size: int) -> Callable[..., tuple[float, int]]:
    """score(params, ids_M, *, progress, desc, stride) -> (total bits, characters scored),
    compiled once; model: the family's module as inference runs it."""
    raise NotImplementedError

  def step_program(self, family: "Family", model: Any, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                   batch_size: int, params: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """(the jitted step the scorer runs, the abstract arguments it is lowered with), for
    --mode=compile; params: the abstract parameters."""
    raise NotImplementedError


def _abstract(shape: tuple[int, ...], dtype: Any, spec: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Protocol):
  """Windows of seq_len inputs, each scoring its last `stride` targets (a stateless model)."""
  name = "sliding_window"

  def attention_length(self, num_chars: int, batch_size: int) -> int:
    return min(self.seq_len, num_chars - 1)

  def min_context(self, attention_length: int) -> int:
    return attention_length - min(self.stride, attention_length) + 1

  def how(self, result: dict[str, Any]) -> str:
    return f"stride {result['stride']}, context {result['context']}"

  def scorer(self, family, model, mesh, rules, batch_size):
    score = scoring.jit_score_fn(scoring.model_score_fn(model), mesh, rules)

    def run(params, ids_M, *, progress=False, desc="eval", stride=None):
      return scoring.evaluate_bits(score, params, ids_M, seq_len=self.seq_len, stride=stride or self.stride,
                                   batch_size=batch_size, mesh=mesh, progress=progress, desc=desc)
    return run

  def step_program(self, family, model, mesh, rules, batch_size, params):
    score = scoring.jit_score_fn(scoring.model_score_fn(model), mesh, rules)
    batch = sharding.batch_sharding(mesh)
    return score, (params, _abstract((batch_size, self.seq_len + 1), jnp.int32, batch),
                   _abstract((batch_size,), jnp.int32, batch))


@dataclasses.dataclass(frozen=True)
class Recurrent(Protocol):
  """batch_size contiguous streams, each read in segments of seq_len with a memory of mem_len
  positions (a model with a memory: family.init_memory)."""
  name = "recurrent"
  mem_len: int = 0  # M, the positions of memory each segment sees.
  clamp_len: int = 0  # Relative distances above it share its encoding; 0: none.
  same_length: bool = False  # Every character sees M + 1 characters (else up to M + T).

  def attention_length(self, num_chars: int, batch_size: int) -> int:
    length = self.mem_len + (1 if self.same_length else self.seq_len)
    return min(length, scoring.stream_len(num_chars, batch_size))

  def min_context(self, attention_length: int) -> int:
    return min(self.mem_len + 1, attention_length)

  def describe(self, num_chars: int, batch_size: int) -> dict[str, Any]:
    return {**super().describe(num_chars, batch_size), "seq_len": self.seq_len, "mem_len": self.mem_len,
            "clamp_len": self.clamp_len, "same_length": self.same_length, "streams": batch_size}

  def how(self, result: dict[str, Any]) -> str:
    return (f"recurrent: segments of {result['seq_len']}, memory {result['mem_len']}, "
            f"attention length {result['attention_length']}")

  def inference_cfg(self, cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, mem_len=self.mem_len, clamp_len=self.clamp_len,
                               same_length=self.same_length)

  def empty_memory(self, family: "Family", model: Any, mesh: jax.sharding.Mesh, rules: sharding.Rules,
              batch_size: int, params: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(abstract, shardings, create(params)) of family.inference_memory's empty memory for
    segments of seq_len (params: concrete or abstract)."""
    init = lambda p: family.inference_memory(model, p, batch_size, self.seq_len)
    boxed = jax.eval_shape(init, params)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    create = sharding.MeshJit(lambda p: nn.unbox(init(p)), mesh, rules, out_shardings=shardings)
    return abstract, shardings, create

  def scorer(self, family, model, mesh, rules, batch_size):
    compiled = {}  # The memory's shardings come from the parameters' shapes: made at the first call.

    def run(params, ids_M, *, progress=False, desc="eval", stride=None):
      del stride  # A segment is scored whole (chartx.load's score refuses a stride).
      if not compiled:
        _, shardings, compiled["empty"] = self.empty_memory(family, model, mesh, rules, batch_size, params)
        compiled["score"] = scoring.jit_segment_score_fn(scoring.model_segment_score_fn(model), shardings,
                                                         mesh, rules)
      return scoring.evaluate_recurrent(compiled["score"], params, compiled["empty"](params), ids_M,
                                        seq_len=self.seq_len, batch_size=batch_size, mesh=mesh,
                                        progress=progress, desc=desc)
    return run

  def step_program(self, family, model, mesh, rules, batch_size, params):
    memory, memory_shardings, _ = self.empty_memory(family, model, mesh, rules, batch_size, params)
    score = scoring.jit_segment_score_fn(scoring.model_segment_score_fn(model), memory_shardings,
                                         mesh, rules)
    segment = _abstract((batch_size, self.seq_len), jnp.int32, sharding.batch_sharding(mesh))
    mask = _abstract((batch_size, self.seq_len), jnp.bool_, sharding.batch_sharding(mesh))
    return score, (params, memory, segment, segment, mask)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """How a family's module decodes (chartx.sample): a cache of `context` positions that slides
  (recurrent False: tokens at explicit positions, re-encoded when full), or a memory that reads
  the text one character at a time and never fills (recurrent True).

  step(variables, tokens_BxT, state, index) -> (logits_BxTxV, state): tokens_BxT at positions
  [index, index + T) (a memory ignores index); init_state(variables, batch_size) -> an empty state
  (made inside the jitted generation: it may depend on the parameters);
  reorder(state, parents_G) -> the state whose row g is row parents_G[g] (None: no beam search).
  """
  step: Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
  init_state: Callable[[Any, int], Any]
  recurrent: bool
  reorder: Callable[[Any, jax.Array], Any] | None = None


class Family:
  """A model family: the defaults below are a stateless model trained on random windows and
  evaluated with sliding windows; a family overrides what differs."""
  name = ""
  # Config keys its checkpoints fix, beyond chartx.run_config.FIXED_ON_RESUME.
  fixed_on_resume: tuple[str, ...] = ()
  # Whether sample.beam_size > 1 may run (the decoder reorders its state).
  beam_search = False

  def check_config(self, config: ml_collections.ConfigDict) -> None:
    """Its own model.* keys, against the rest of the run config (UserError naming a bad one):
    data.seq_len, where its modules take windows or segments of at most some length."""

  def attention(self, impl: str) -> str:
    """The attention implementation it runs, of the one config.model.attention resolved to."""
    return impl

  def build(self, cfg: ModelConfig, deterministic: bool = True, all_layers: bool = False) -> nn.Module:
    raise NotImplementedError

  def init_memory(self, cfg: ModelConfig, batch_size: int) -> Any:
    """The empty extra state of batch_size rows carried from step to step, every leaf
    nn.LogicallyPartitioned with logical axis names, one of them "batch" (sharding.sharded_init
    shards it); None: the family carries none."""
    return None

  def inference_memory(self, module: nn.Module, params: Any, batch_size: int, seq_len: int) -> Any:
    """The empty memory of batch_size rows that recurrent evaluation carries from segment to
    segment of seq_len (boxed as init_memory's): by default the train state's memory; a family
    may keep a faster form of it that needs no gradient (XL: projected keys and values)."""
    del params, seq_len
    return self.init_memory(module.cfg, batch_size)

  def reset_memory(self, memory: Any, reset_B: jax.Array) -> Any:
    """The memory with the rows where reset_B is true emptied (their stream starts over)."""
    return memory

  def apply(self, module: nn.Module, variables: Any, inputs_BxT: jax.Array, memory: Any,
            rngs: dict[str, jax.Array]) -> tuple[Any, Any]:
    """(the residual stream, as module(inputs_BxT) returns it; the new memory)."""
    return module.apply(variables, inputs_BxT, rngs=rngs), memory

  def init_params(self, module: nn.Module, rng: jax.Array, seq_len: int) -> Any:
    """Fresh parameters, nn.Partitioned-boxed with logical axis names."""
    tokens_1xT = jnp.zeros((1, seq_len), jnp.int32)
    memory = nn.unbox(self.init_memory(module.cfg, 1))
    inputs = (tokens_1xT,) if memory is None else (tokens_1xT, memory)
    return module.clone(deterministic=True, all_layers=False).init(rng, *inputs)["params"]

  def check_train_data(self, num_chars: int, config: ml_collections.ConfigDict) -> None:
    """UserError if a training split of num_chars cannot feed its batches (before anything slow)."""

  def train_batch(self, train_M: np.ndarray, config: ml_collections.ConfigDict, step: int, *,
                  num_targets: int, process_index: int,
                  process_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(windows_BxS, reset_B): this process's rows of step's batch, S = data.seq_len + num_targets,
    and which rows' memory to empty first. Default: windows at random positions, no resets."""
    windows_BxS = data.train_batch(train_M, seed=config.seed, step=step, batch_size=config.train.batch_size,
                                   length=config.data.seq_len + num_targets,
                                   process_index=process_index, process_count=process_count)
    return windows_BxS, np.zeros(len(windows_BxS), bool)

  def check_eval_config(self, config: ml_collections.ConfigDict) -> None:
    """Its protocol's eval.* keys (UserError naming a bad one). Default: the sliding window's
    stride; the recurrent protocol's keys left at their defaults."""
    e = config.eval
    if not 0 <= e.stride <= config.data.seq_len:
      raise UserError(f"config.eval.stride={e.stride} must be in [0, data.seq_len={config.data.seq_len}] "
                      "(0: data.seq_len)")
    recurrent = {"seq_len": (e.seq_len, 0), "mem_len": (e.mem_len, -1), "clamp_len": (e.clamp_len, -1),
                 "same_length": (e.same_length.lower(), "auto")}
    for key, (value, default) in recurrent.items():
      if value != default:
        raise UserError(f"config.eval.{key}={e[key]!r} is Transformer-XL's recurrent evaluation; "
                        f"model.family={config.model.family} evaluates with a sliding window "
                        "(eval.stride): leave it out")

  def protocol(self, config: ml_collections.ConfigDict) -> Protocol:
    """Its evaluation protocol with the eval.* keys resolved (check_eval_config checks them)."""
    return SlidingWindow(seq_len=config.data.seq_len, stride=config.eval.stride or config.data.seq_len)

  def decoder(self, module: nn.Module, context: int) -> Decoder:
    """How module (deterministic, as inference runs it) decodes; context: the fixed context."""
    raise NotImplementedError

  def flops_per_char(self, cfg: ModelConfig, seq_len: int, intermediate_layers: bool = True,
                     batch_size: int = 1) -> float:
    """Model FLOPs of one training character, forward and backward (for MFU)."""
    return cfg.flops_per_char(seq_len, intermediate_layers)
