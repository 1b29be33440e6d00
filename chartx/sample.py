"""Autoregressive generation with a KV cache (the fixed family) or a memory (Transformer-XL):
temperature, top-k, top-p and greedy decoding.

The sampler sees the model only through a callback (as in Flax's lm1b example), so it can be
tested with fake logits:

    tokens_to_logits(variables, tokens_BxT, cache, index) -> (logits_BxTxV, cache)

where tokens_BxT sit at positions [index, index + T) and the cache holds positions [0, index).
T = 1 is one decoding step; T = context fills a fresh cache (prefill).

The positions are absolute (a learned table per layer), so the context cannot simply roll. When
the cache is full (`context` characters), the last context // 2 characters are re-encoded into
a fresh cache at positions 0.. and generation goes on: each new character sees between
context // 2 and context characters. The context is data.seq_len, the positions the model was
trained on; a longer prompt is cut to its last seq_len characters. The whole loop of num_chars
characters is one jitted lax.fori_loop; the prompt enters as a fixed-size padded block, so
prompts of any length share one compilation.

Transformer-XL needs no cache of its own and never re-encodes: its positions are relative, and
its memory (the last eval.mem_len positions of every layer) carries the text so far. The prompt
is read one character at a time, then each drawn character is, so every character costs one
position with the memory, however long the text (make_recurrent_generate). Its prompt is padded
to the next power of two (at least 64), so prompts of similar lengths share a compilation.

--mode=sample prints the prompt and its continuation on stdout (timing on stderr).

    python -m chartx.main --config=configs/tiny.py --workdir=DIR --mode=sample \
        --config.sample.prompt="def " --config.sample.temperature=0.8
"""

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chartx import data, evaluate, inference, sharding
from chartx import model as model_lib
from chartx.errors import UserError

TokensToLogits = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
# (variables, tokens_Bx1, memory) -> (logits_BxV, memory): a model with a memory reads one character.
ReadChar = Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a character is chosen from the logits. temperature 0 is greedy (argmax)."""
  temperature: float = 1.0
  top_k: int = 0  # 0 keeps every character.
  top_p: float = 1.0  # 1 keeps every character.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int) -> "SamplingConfig":
    s = config.sample
    if s.temperature < 0:
      raise UserError(f"config.sample.temperature must be >= 0 (0 is greedy), got {s.temperature}")
    if not 0 <= s.top_k <= vocab_size:
      raise UserError(f"config.sample.top_k must be in [0, {vocab_size}] (0 keeps all), got {s.top_k}")
    if not 0 < s.top_p <= 1:
      raise UserError(f"config.sample.top_p must be in (0, 1] (1 keeps all), got {s.top_p}")
    return cls(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p))


def filter_logits(logits_BxV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p: the characters left out get -inf."""
  logits_BxV = logits_BxV.astype(jnp.float32) / cfg.temperature
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  if cfg.top_k:
    logits_BxV = jnp.where(logits_BxV >= sorted_BxV[:, cfg.top_k - 1:cfg.top_k], logits_BxV, -jnp.inf)
    sorted_BxV = jnp.where(jnp.arange(sorted_BxV.shape[1]) < cfg.top_k, sorted_BxV, -jnp.inf)
  if cfg.top_p < 1:
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the most likely characters until their mass reaches top_p (always at least one).
    keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < cfg.top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)
  return logits_BxV


def choose(logits_BxV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """The next ids_B: argmax if temperature is 0, else a draw from the filtered distribution."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BxV, cfg), axis=-1).astype(jnp.int32)


def make_generate(tokens_to_logits: TokensToLogits, *, context: int, num_chars: int,
                  sampling: SamplingConfig) -> Callable[..., jax.Array]:
  """A jitted generate(variables, cache, prompt_C, prompt_len, rng) -> ids_M of num_chars.

  prompt_C holds the prompt's (last at most `context`) ids left-aligned, padded to `context`;
  cache is an empty cache of `context` positions (its contents are overwritten).
  """
  refill = max(1, context // 2)

  def prefill(variables, cache, block_1xC, length):
    """Encodes block[:length] at positions 0..length-1; the logits predict the character after."""
    logits_1xCxV, cache = tokens_to_logits(variables, block_1xC, cache, jnp.zeros((), jnp.int32))
    return jax.lax.dynamic_index_in_dim(logits_1xCxV, length - 1, axis=1, keepdims=False), cache

  def generate(variables, cache, prompt_C, prompt_len, rng):
    logits_1xV, cache = prefill(variables, cache, prompt_C[None], prompt_len)
    # The text so far, right-aligned: its last `context` characters (a re-encoding's source).
    window_C = jnp.roll(prompt_C, context - prompt_len)

    def body(i, carry):
      logits_1xV, cache, index, window_C, rng, ids_M = carry
      rng, draw = jax.random.split(rng)
      next_1 = choose(logits_1xV, draw, sampling)
      ids_M = ids_M.at[i].set(next_1[0])
      window_C = jnp.concatenate([window_C[1:], next_1])

      def step(cache):
        logits_1x1xV, cache = tokens_to_logits(variables, next_1[None], cache, index)
        return logits_1x1xV[:, 0], cache, index + 1

      def slide(cache):
        block_C = jnp.concatenate([window_C[context - refill:], jnp.zeros(context - refill, jnp.int32)])
        logits_1xV, cache = prefill(variables, cache, block_C[None], refill)
        return logits_1xV, cache, jnp.int32(refill)

      logits_1xV, cache, index = jax.lax.cond(index < context, step, slide, cache)
      return logits_1xV, cache, index, window_C, rng, ids_M

    carry = (logits_1xV, cache, prompt_len, window_C, rng, jnp.zeros(num_chars, jnp.int32))
    return jax.lax.fori_loop(0, num_chars, body, carry)[-1]

  return jax.jit(generate)


def make_recurrent_generate(read_char: ReadChar, *, num_chars: int,
                            sampling: SamplingConfig) -> Callable[..., jax.Array]:
  """A jitted generate(variables, memory, prompt_C, prompt_len, rng) -> ids_M of num_chars for a
  model with a memory: the first prompt_len (>= 1) ids of prompt_C are read one by one, then each
  drawn character, so each costs read_char's one position whatever came before. memory: an empty
  memory of one row. Draws as make_generate does (one key split per character)."""

  def generate(variables, memory, prompt_C, prompt_len, rng):
    read = lambda i, carry: read_char(variables, prompt_C[i][None, None], carry[1])
    carry = read(0, (None, memory))
    logits_1xV, memory = jax.lax.fori_loop(1, prompt_len, read, carry)

    def body(i, carry):
      logits_1xV, memory, rng, ids_M = carry
      rng, draw = jax.random.split(rng)
      next_1 = choose(logits_1xV, draw, sampling)
      logits_1xV, memory = read_char(variables, next_1[None], memory)
      return logits_1xV, memory, rng, ids_M.at[i].set(next_1[0])

    carry = (logits_1xV, memory, rng, jnp.zeros(num_chars, jnp.int32))
    return jax.lax.fori_loop(0, num_chars, body, carry)[-1]

  return jax.jit(generate)


def model_read_char(model: Any) -> ReadChar:
  """A Transformer-XL's ReadChar: its last layer's next-character logits, the memory updated."""
  net = model.clone(deterministic=True, all_layers=False)

  def read_char(variables, tokens_1x1, memory):
    logits_1x1xV, memory = net.apply(variables, tokens_1x1, memory, method="logits")
    return logits_1x1xV[:, 0], memory
  return read_char


def prompt_block(prompt_ids: np.ndarray, context: int) -> tuple[np.ndarray, int]:
  """(prompt_C, length): the prompt's last `context` ids, left-aligned and zero-padded."""
  ids = np.asarray(prompt_ids, np.int32)[-context:]
  return np.pad(ids, (0, context - len(ids))), len(ids)


def model_tokens_to_logits(model: model_lib.Transformer) -> TokensToLogits:
  net = model.clone(deterministic=True, all_layers=False)
  return lambda variables, tokens_BxT, cache, index: net.apply(
      variables, tokens_BxT, cache, index, method="decode")


def encode_prompt(vocab: data.Vocab, prompt: str) -> np.ndarray:
  """The prompt's ids; characters outside the vocabulary raise UserError naming sample.prompt."""
  if not prompt:
    raise UserError("config.sample.prompt is empty; generation needs at least one character")
  return vocab.encode(prompt, source="config.sample.prompt")


def check_config(config: ml_collections.ConfigDict, vocab: data.Vocab) -> tuple[np.ndarray, SamplingConfig]:
  """The sample section's owner: every sample.* key (UserError naming a bad one); the prompt's ids."""
  if config.sample.num_chars < 1:
    raise UserError(f"config.sample.num_chars must be >= 1, got {config.sample.num_chars}")
  return encode_prompt(vocab, config.sample.prompt), SamplingConfig.from_config(config, vocab.size)


def model_generator(restored: inference.Restored, *, context: int, num_chars: int,
                    sampling: SamplingConfig) -> Callable[[np.ndarray, int], np.ndarray]:
  """generate(prompt_ids, seed) -> ids_M: num_chars ids continuing the prompt, drawn by a restored
  model, compiled once for any prompt (--mode=sample and chartx.load's generate use it).

  The fixed family sees the last `context` characters; a Transformer-XL (restored.model as
  evaluate.inference_model gives it) reads the whole prompt and needs no context.
  """
  cfg = restored.model.cfg
  if cfg.family == "xl":
    generate = sharding.MeshJit(make_recurrent_generate(model_read_char(restored.model),
                                                        num_chars=num_chars, sampling=sampling),
                                restored.mesh, restored.rules)

    def run_recurrent(prompt_ids: np.ndarray, seed: int) -> np.ndarray:
      block = max(64, 1 << (len(prompt_ids) - 1).bit_length())  # A compilation per power of two.
      prompt_C, length = prompt_block(prompt_ids, block)
      return np.asarray(generate({"params": restored.params}, cfg.init_memory(1), prompt_C, length,
                                 jax.random.key(seed)))
    return run_recurrent

  generate = sharding.MeshJit(make_generate(model_tokens_to_logits(restored.model), context=context,
                                           num_chars=num_chars, sampling=sampling),
                             restored.mesh, restored.rules)

  def run(prompt_ids: np.ndarray, seed: int) -> np.ndarray:
    prompt_C, length = prompt_block(prompt_ids, context)
    cache = restored.model.cfg.init_cache(1, context)
    return np.asarray(generate({"params": restored.params}, cache, prompt_C, length,
                               jax.random.key(seed)))
  return run


def sample_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: the prompt and its continuation, from the checkpoint eval.step/eval.best choose."""
  vocab = data.vocab_for(config.data)
  prompt_ids, sampling = check_config(config, vocab)
  restored = inference.restore(config, workdir, vocab.size)
  # Transformer-XL samples with the memory it evaluates with (eval.mem_len, ...).
  restored = dataclasses.replace(restored, model=evaluate.inference_model(restored.model,
                                                                          evaluate.protocol(config)))
  # The fixed family's context is the positions the model was trained on.
  generate = model_generator(restored, context=config.data.seq_len,
                             num_chars=config.sample.num_chars, sampling=sampling)
  start = time.time()
  ids_M = generate(prompt_ids, config.sample.seed)
  seconds = time.time() - start
  if jax.process_index() == 0:
    print(f"sample: step {restored.step}, {len(ids_M)} characters in {seconds:.1f}s "
          "(compilation included)", file=sys.stderr, flush=True)
  return config.sample.prompt + vocab.decode(ids_M)
