"""Autoregressive generation with a KV cache (the fixed family) or a memory (Transformer-XL):
temperature, top-k, top-p and greedy decoding, and beam search (the fixed family).

The sampler sees the model only through a callback (as in Flax's lm1b example), so it can be
tested with fake logits:

    tokens_to_logits(variables, tokens_BxT, cache, index) -> (logits_BxTxV, cache)

where tokens_BxT sit at positions [index, index + T) and the cache holds positions [0, index).
T = 1 is one decoding step; T = context fills a fresh cache (prefill).

The cached keys carry their positions (a learned table, a sinusoid or a rotation), and the model
knows no position past the seq_len it was trained on, so the context cannot simply roll. When
the cache is full (`context` characters), the last context // 2 characters are re-encoded into
a fresh cache at positions 0.. and generation goes on: each new character sees between
context // 2 and context characters. The context is data.seq_len, the positions the model was
trained on; a longer prompt is cut to its last seq_len characters. The whole loop of num_chars
characters is one jitted lax.fori_loop; the prompt enters as a fixed-size padded block, so
prompts of any length share one compilation.

Transformer-XL never re-encodes: its positions are relative, and its memory (the keys and
values of the last eval.mem_len positions of every layer, projected once: xl.Cache) carries the
text so far. The prompt is read one character at a time, then each drawn character is, so every
character costs one position with the memory, however long the text (make_recurrent_generate). Its prompt is padded
to the next power of two (at least 64), so prompts of similar lengths share a compilation.

--mode=sample prints the prompt and its continuation on stdout (timing on stderr).

Beam search (sample.beam_size = G > 1) keeps the G most likely continuations so far, G rows of
one cache: each step extends every row by every character, keeps the G best sums of
log-probabilities, and gathers the cache rows of their parents (reorder_cache). Greedy decoding
is G = 1, and misses a continuation whose first character is not the most likely one; an
exhaustive search over V^M continuations is out of reach, and G trades between the two. It is
deterministic and returns the highest-scoring of the G final continuations with its
log-probability (nats; printed on stderr by --mode=sample). A full cache slides as in sampling,
so past `context` characters the log-probability is the model's under that sliding context.

    python -m chartx.main --config=configs/tiny.py --workdir=DIR --mode=sample \
        --config.sample.prompt="def " --config.sample.temperature=0.8
    python -m chartx.main --config=configs/tiny.py --workdir=DIR --mode=sample \
        --config.sample.prompt="def " --config.sample.beam_size=4
"""

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chartx import data, inference, sharding
from chartx.families import base, registry
from chartx.errors import UserError

TokensToLogits = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
# (variables, tokens_Bx1, memory) -> (logits_BxV, memory): a model with a memory reads one character.
ReadChar = Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]
# (cache, parents_G) -> the cache whose row g is row parents_G[g] of the given one (beam search).
ReorderCache = Callable[[Any, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a character is chosen from the logits. temperature 0 is greedy (argmax); beam_size > 1
  is beam search instead of sampling (temperature, top_k and top_p at their defaults)."""
  temperature: float = 1.0
  top_k: int = 0  # 0 keeps every character.
  top_p: float = 1.0  # 1 keeps every character.
  beam_size: int = 1  # 1 samples (or is greedy); more: beam search with this many beams.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int) -> "SamplingConfig":
    s = config.sample
    if s.temperature < 0:
      raise UserError(f"config.sample.temperature must be >= 0 (0 is greedy), got {s.temperature}")
    if not 0 <= s.top_k <= vocab_size:
      raise UserError(f"config.sample.top_k must be in [0, {vocab_size}] (0 keeps all), got {s.top_k}")
    if not 0 < s.top_p <= 1:
      raise UserError(f"config.sample.top_p must be in (0, 1] (1 keeps all), got {s.top_p}")
    if not 1 <= s.beam_size <= vocab_size:
      raise UserError(f"config.sample.beam_size must be in [1, {vocab_size}] (1: sampling), got {s.beam_size}")
    if s.beam_size > 1 and not registry.get(config.model.family).beam_search:
      raise UserError(f"config.sample.beam_size={s.beam_size}: beam search runs on the fixed family's "
                      f"KV cache; config.model.family={config.model.family} samples (beam_size 1)")
    if s.beam_size > 1:
      # Beam search ranks continuations by the model's own likelihood: sampling's knobs do not apply.
      for key, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
        if s[key] != default:
          raise UserError(f"config.sample.{key}={s[key]} is for sampling; with config.sample.beam_size="
                          f"{s.beam_size} (beam search) leave it at {default}")
    return cls(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
               beam_size=int(s.beam_size))


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
  prefill = functools.partial(_prefill, tokens_to_logits)

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


def make_recurrent_generate(decoder: base.Decoder, *, num_chars: int,
                            sampling: SamplingConfig) -> Callable[..., jax.Array]:
  """A jitted generate(variables, prompt_C, prompt_len, rng) -> ids_M of num_chars for a model
  with a memory (a recurrent decoder): the first prompt_len (>= 1) ids of prompt_C are read one
  by one into an empty memory of one row, then each drawn character, so each costs one position
  whatever came before. Draws as make_generate does (one key split per character)."""
  read_one = read_char(decoder)

  def generate(variables, prompt_C, prompt_len, rng):
    read = lambda i, carry: read_one(variables, prompt_C[i][None, None], carry[1])
    carry = read(0, (None, decoder.init_state(variables, 1)))
    logits_1xV, memory = jax.lax.fori_loop(1, prompt_len, read, carry)

    def body(i, carry):
      logits_1xV, memory, rng, ids_M = carry
      rng, draw = jax.random.split(rng)
      next_1 = choose(logits_1xV, draw, sampling)
      logits_1xV, memory = read_one(variables, next_1[None], memory)
      return logits_1xV, memory, rng, ids_M.at[i].set(next_1[0])

    carry = (logits_1xV, memory, rng, jnp.zeros(num_chars, jnp.int32))
    return jax.lax.fori_loop(0, num_chars, body, carry)[-1]

  return jax.jit(generate)


def read_char(decoder: base.Decoder) -> ReadChar:
  """The ReadChar of a recurrent decoder (a model with a memory): one character's next-character
  logits, the memory updated."""
  def read(variables, tokens_1x1, memory):
    logits_1x1xV, memory = decoder.step(variables, tokens_1x1, memory, jnp.zeros((), jnp.int32))
    return logits_1x1xV[:, 0], memory
  return read


def _prefill(tokens_to_logits: TokensToLogits, variables: Any, cache: Any, block_BxC: jax.Array,
             length: jax.Array) -> tuple[jax.Array, Any]:
  """Encodes each row's block[:length] at positions 0..length-1 into a fresh cache; the logits_BxV
  predict the character after."""
  logits_BxCxV, cache = tokens_to_logits(variables, block_BxC, cache, jnp.zeros((), jnp.int32))
  return jax.lax.dynamic_index_in_dim(logits_BxCxV, length - 1, axis=1, keepdims=False), cache


def make_beam_search(tokens_to_logits: TokensToLogits, reorder_cache: ReorderCache, *, context: int,
                     num_chars: int, beam_size: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """A jitted beam_search(variables, cache, prompt_C, prompt_len) -> (ids_M, log_prob): the most
  likely continuation of num_chars that a beam of beam_size = G finds, and its log-probability.

  prompt_C as make_generate's; cache is an empty cache of G rows and `context` positions.
  """
  refill, G = max(1, context // 2), beam_size
  prefill = functools.partial(_prefill, tokens_to_logits)

  def search(variables, cache, prompt_C, prompt_len):
    logits_GxV, cache = prefill(variables, cache, jnp.tile(prompt_C, (G, 1)), prompt_len)
    window_GxC = jnp.tile(jnp.roll(prompt_C, context - prompt_len), (G, 1))
    # The G rows start as copies of the prompt: only row 0 is live, so no continuation is kept twice.
    score_G = jnp.full(G, -jnp.inf).at[0].set(0.0)

    def body(i, carry):
      logits_GxV, cache, index, window_GxC, score_G, ids_GxM = carry
      logp_GxV = jax.nn.log_softmax(logits_GxV.astype(jnp.float32), axis=-1)
      vocab = logp_GxV.shape[-1]
      # The G best of the G x V one-character extensions, best first.
      score_G, flat_G = jax.lax.top_k((score_G[:, None] + logp_GxV).reshape(-1), G)
      parent_G, next_G = flat_G // vocab, (flat_G % vocab).astype(jnp.int32)
      ids_GxM = ids_GxM[parent_G].at[:, i].set(next_G)
      window_GxC = jnp.concatenate([window_GxC[parent_G, 1:], next_G[:, None]], axis=1)
      cache = reorder_cache(cache, parent_G)

      def step(cache):
        logits_Gx1xV, cache = tokens_to_logits(variables, next_G[:, None], cache, index)
        return logits_Gx1xV[:, 0], cache, index + 1

      def slide(cache):  # As the sampler slides: the last `refill` characters in a fresh cache.
        block_GxC = jnp.concatenate([window_GxC[:, context - refill:],
                                     jnp.zeros((G, context - refill), jnp.int32)], axis=1)
        logits_GxV, cache = prefill(variables, cache, block_GxC, refill)
        return logits_GxV, cache, jnp.int32(refill)

      logits_GxV, cache, index = jax.lax.cond(index < context, step, slide, cache)
      return logits_GxV, cache, index, window_GxC, score_G, ids_GxM

    carry = (logits_GxV, cache, prompt_len, window_GxC, score_G, jnp.zeros((G, num_chars), jnp.int32))
    _, _, _, _, score_G, ids_GxM = jax.lax.fori_loop(0, num_chars, body, carry)
    return ids_GxM[0], score_G[0]  # top_k keeps the rows sorted: row 0 is the best.

  return jax.jit(search)


def prompt_block(prompt_ids: np.ndarray, context: int) -> tuple[np.ndarray, int]:
  """(prompt_C, length): the prompt's last `context` ids, left-aligned and zero-padded."""
  ids = np.asarray(prompt_ids, np.int32)[-context:]
  return np.pad(ids, (0, context - len(ids))), len(ids)


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

  The family's decoder says how: a cache of the last `context` characters (the fixed family), or a
  memory that reads the whole prompt and needs no context (Transformer-XL).
  """
  decoder = restored.family.decoder(restored.model, context)
  if decoder.recurrent:
    generate = sharding.MeshJit(make_recurrent_generate(decoder, num_chars=num_chars, sampling=sampling),
                                restored.mesh, restored.rules)

    def run_recurrent(prompt_ids: np.ndarray, seed: int) -> np.ndarray:
      block = max(64, 1 << (len(prompt_ids) - 1).bit_length())  # A compilation per power of two.
      prompt_C, length = prompt_block(prompt_ids, block)
      return np.asarray(generate({"params": restored.params}, prompt_C, length, jax.random.key(seed)))
    return run_recurrent

  generate = sharding.MeshJit(make_generate(decoder.step, context=context, num_chars=num_chars,
                                            sampling=sampling), restored.mesh, restored.rules)

  def run(prompt_ids: np.ndarray, seed: int) -> np.ndarray:
    prompt_C, length = prompt_block(prompt_ids, context)
    variables = {"params": restored.params}
    return np.asarray(generate(variables, decoder.init_state(variables, 1), prompt_C, length,
                               jax.random.key(seed)))
  return run


def model_beam_search(restored: inference.Restored, *, context: int, num_chars: int,
                      beam_size: int) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
  """search(prompt_ids) -> (ids_M, log_prob): make_beam_search on a restored model (a family whose
  decoder reorders its state), compiled once for any prompt (--mode=sample and chartx.load's
  beam_search use it)."""
  decoder = restored.family.decoder(restored.model, context)
  search = sharding.MeshJit(make_beam_search(decoder.step, decoder.reorder, context=context,
                                             num_chars=num_chars, beam_size=beam_size),
                            restored.mesh, restored.rules)

  def run(prompt_ids: np.ndarray) -> tuple[np.ndarray, float]:
    prompt_C, length = prompt_block(prompt_ids, context)
    variables = {"params": restored.params}
    ids_M, log_prob = search(variables, decoder.init_state(variables, beam_size), prompt_C, length)
    return np.asarray(ids_M), float(log_prob)
  return run


def sample_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: the prompt and its continuation, from the checkpoint eval.step/eval.best choose."""
  vocab = data.vocab_for(config.data)
  prompt_ids, sampling = check_config(config, vocab)
  # The model as the family's protocol runs it: Transformer-XL samples with the memory it
  # evaluates with (eval.mem_len, ...).
  restored = inference.restore(config, workdir, vocab.size)
  # The fixed family's context is the positions the model was trained on.
  context, num_chars = config.data.seq_len, config.sample.num_chars
  start = time.time()
  if sampling.beam_size > 1:
    ids_M, log_prob = model_beam_search(restored, context=context, num_chars=num_chars,
                                        beam_size=sampling.beam_size)(prompt_ids)
    how = (f"beam search of {sampling.beam_size}, log-probability {log_prob:.4f} nats "
           f"({-log_prob / math.log(2) / num_chars:.4f} bits per character), ")
  else:
    ids_M = model_generator(restored, context=context, num_chars=num_chars,
                            sampling=sampling)(prompt_ids, config.sample.seed)
    how = ""
  seconds = time.time() - start
  if jax.process_index() == 0:
    print(f"sample: step {restored.step}, {len(ids_M)} characters, {how}in {seconds:.1f}s "
          "(compilation included)", file=sys.stderr, flush=True)
  return config.sample.prompt + vocab.decode(ids_M)
