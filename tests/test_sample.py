"""Sampling: cached decoding equals the full forward pass, the sampler's bookkeeping, --mode=sample."""

import dataclasses
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chartx import data, sample
from chartx.families import fixed, layers, registry
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 256
GREEDY = sample.SamplingConfig(temperature=0.0)


def _model(tiny_config, **overrides):
  cfg = dataclasses.replace(registry.model_config(tiny_config, V), **overrides)
  net = fixed.Transformer(cfg)
  init = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))
  return net, flax.linen.unbox(init)["params"]


@pytest.mark.parametrize("overrides", [
    {},  # Scanned layers, a positional table per layer.
    dict(scan_layers=False, positions="input", tie_embeddings=True, num_targets=2),
    dict(positions="sinusoid"),
    dict(positions="rope"),
    dict(positions="rope", scan_layers=False),
])
def test_cached_decoding_equals_the_full_forward_at_every_position(tiny_config, overrides):
  net, params = _model(tiny_config, **overrides)
  T = net.cfg.max_len
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, T), 0, V)
  full_BxTxV = jax.jit(lambda t: net.apply({"params": params}, t, method=fixed.Transformer.logits))(
      tokens_BxT)
  decode = jax.jit(lambda t, c, i: net.apply({"params": params}, t, c, i,
                                             method=fixed.Transformer.decode))
  # As the sampler does: a prefill of a full block whose tail (after `known`) is junk, then one
  # character per step, each overwriting the junk at its position.
  known = 9
  junk_BxT = tokens_BxT.at[:, known:].set((tokens_BxT[:, known:] + 7) % V)
  prefill_BxTxV, cache = decode(junk_BxT, net.cfg.init_cache(2, T), 0)
  steps = [prefill_BxTxV[:, :known]]
  for i in range(known, T):
    logits_Bx1xV, cache = decode(tokens_BxT[:, i:i + 1], cache, i)
    steps.append(logits_Bx1xV)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BxTxV, atol=2e-5, rtol=1e-5)


def _next_id(variables, tokens_BxT, cache, index):
  """Fake logits: every position predicts its own id + 1."""
  return 10.0 * jax.nn.one_hot((tokens_BxT + 1) % V, V), cache


def _generate(tokens_to_logits, prompt, num_chars, context, sampling=GREEDY, cache=(), seed=0):
  generate = sample.make_generate(tokens_to_logits, context=context, num_chars=num_chars, sampling=sampling)
  prompt_C, length = sample.prompt_block(np.frombuffer(prompt.encode(), np.uint8), context)
  return generate(None, cache, prompt_C, length, jax.random.key(seed)), generate


@pytest.mark.parametrize("sampling", [
    GREEDY, sample.SamplingConfig(temperature=1.0, top_k=1),
    sample.SamplingConfig(temperature=0.7, top_p=0.5)])
def test_sampler_with_next_id_logits_spells_the_alphabet(sampling):
  # 20 characters from a context of 8: the cache is re-encoded several times on the way.
  ids_M, generate = _generate(_next_id, "abc", 20, context=8, sampling=sampling)
  assert data.BYTES.decode(ids_M) == "defghijklmnopqrstuvw"
  # A prompt of another length, even one longer than the context, reuses the compilation.
  ids_M = generate(None, (), *sample.prompt_block(data.BYTES.encode("ABCDEFGHIJKL"), 8), jax.random.key(0))
  assert data.BYTES.decode(ids_M) == "MNOPQRSTUVWXYZ[\\]^_`"
  assert generate._cache_size() == 1  # pylint: disable=protected-access


def test_sampler_context_slides_as_documented():
  """A fake whose prediction depends on the whole cache: (sum of the ids it holds) mod V."""
  context, refill = 6, 3

  def context_sum(variables, tokens_BxT, cache_C, index):
    cache_C = jax.lax.dynamic_update_slice_in_dim(cache_C, tokens_BxT[0], index, 0)
    visible_TxC = jnp.arange(cache_C.shape[0])[None, :] <= index + jnp.arange(tokens_BxT.shape[1])[:, None]
    next_T = jnp.where(visible_TxC, cache_C[None, :], 0).sum(-1) % V
    return 10.0 * jax.nn.one_hot(next_T, V)[None], cache_C

  prompt = "Hi"
  ids_M, _ = _generate(context_sum, prompt, 25, context, cache=jnp.zeros(context, jnp.int32))
  # The documented rule: the context grows to `context` ids, then restarts from the last context // 2.
  text, visible = list(prompt.encode()), list(prompt.encode())
  for _ in range(25):
    text.append(sum(visible) % V)
    visible = visible + [text[-1]] if len(visible) < context else text[-refill:]
  assert list(np.asarray(ids_M)) == text[len(prompt):]


def test_greedy_cached_generation_matches_recomputing_the_context(tiny_config):
  net, params = _model(tiny_config)
  context = net.cfg.max_len
  tokens_to_logits = fixed.FAMILY.decoder(net, context).step
  generate = sample.make_generate(tokens_to_logits, context=context, num_chars=40, sampling=GREEDY)
  prompt = data.BYTES.encode("def main")
  ids_M = np.asarray(generate({"params": params}, net.cfg.init_cache(1, context),
                              *sample.prompt_block(prompt, context), jax.random.key(0)))
  # No cache: the full forward pass over the visible context, padded to one shape.
  logits = jax.jit(lambda t: net.apply({"params": params}, t, method=fixed.Transformer.logits))
  text, visible = list(prompt), list(prompt)
  for _ in range(40):
    tokens_1xC = np.pad(np.asarray(visible, np.int32), (0, context - len(visible)))[None]
    text.append(int(np.argmax(logits(tokens_1xC)[0, len(visible) - 1])))
    visible = visible + [text[-1]] if len(visible) < context else text[-(context // 2):]
  assert list(ids_M) == text[len(prompt):]


def test_beam_of_one_is_greedy_decoding_through_slides_of_the_context(tiny_config):
  net, params = _model(tiny_config)
  context = net.cfg.max_len
  tokens_to_logits = fixed.FAMILY.decoder(net, context).step
  prompt_C, length = sample.prompt_block(data.BYTES.encode("def main"), context)
  greedy = sample.make_generate(tokens_to_logits, context=context, num_chars=80, sampling=GREEDY)
  greedy_M = greedy({"params": params}, net.cfg.init_cache(1, context), prompt_C, length, jax.random.key(0))
  beam = sample.make_beam_search(tokens_to_logits, fixed.FAMILY.decoder(net, context).reorder, context=context,
                                 num_chars=80, beam_size=1)
  beam_M, _ = beam({"params": params}, net.cfg.init_cache(1, context), prompt_C, length)
  np.testing.assert_array_equal(beam_M, greedy_M)  # 80 characters: the context slides 4 times.


def test_beam_log_probability_is_the_full_forward_likelihood_of_its_continuation(tiny_config):
  """With several beams the cache rows are gathered every step: a wrong gather shows here."""
  net, params = _model(tiny_config)
  prompt = data.BYTES.encode("def ")
  decoder = fixed.FAMILY.decoder(net, net.cfg.max_len)
  beam = sample.make_beam_search(decoder.step, decoder.reorder, context=net.cfg.max_len, num_chars=20, beam_size=4)
  ids_M, log_prob = beam({"params": params}, net.cfg.init_cache(4, net.cfg.max_len),
                         *sample.prompt_block(prompt, net.cfg.max_len))
  tokens_1xT = jnp.concatenate([jnp.asarray(prompt, jnp.int32), ids_M])[None]
  logits_1xTxV = net.apply({"params": params}, tokens_1xT[:, :-1], method=fixed.Transformer.logits)
  logp_TxV = jax.nn.log_softmax(logits_1xTxV[0], axis=-1)
  want = sum(float(logp_TxV[len(prompt) - 1 + i, int(c)]) for i, c in enumerate(ids_M))
  np.testing.assert_allclose(float(log_prob), want, rtol=1e-5)


# A fake model whose next character depends on the last one only, with hand-set probabilities.
# After "a": b 0.6, c 0.4. After b: d 0.3, e 0.25, f 0.25, g 0.2. After c: h 0.9, i 0.1. Anything
# else: "a". Greedy takes b (0.6) and then at best d: 0.6 x 0.3 = 0.18; c then h is 0.4 x 0.9 = 0.36.
_CHAIN = {"a": {"b": 0.6, "c": 0.4}, "b": {"d": 0.3, "e": 0.25, "f": 0.25, "g": 0.2},
          "c": {"h": 0.9, "i": 0.1}}


def _chain_logits(variables, tokens_BxT, cache, index):
  table_VxV = np.full((V, V), -1e9, np.float32)
  table_VxV[:, ord("a")] = 0.0
  for prev, nexts in _CHAIN.items():
    table_VxV[ord(prev)] = -1e9
    for char, p in nexts.items():
      table_VxV[ord(prev), ord(char)] = np.log(p)
  return jnp.asarray(table_VxV)[tokens_BxT], cache


def test_beam_search_finds_the_likelier_continuation_that_greedy_misses():
  greedy_M, _ = _generate(_chain_logits, "a", 3, context=8)
  assert data.BYTES.decode(greedy_M) == "bda"
  prompt_C, length = sample.prompt_block(data.BYTES.encode("a"), 8)
  beam = sample.make_beam_search(_chain_logits, lambda cache, parents_G: cache, context=8, num_chars=3,
                                 beam_size=2)
  ids_M, log_prob = beam(None, (), prompt_C, length)
  assert data.BYTES.decode(ids_M) == "cha"
  np.testing.assert_allclose(float(log_prob), np.log(0.4) + np.log(0.9) + np.log(1.0), rtol=1e-6)
  one_M, one_log_prob = sample.make_beam_search(_chain_logits, lambda c, p: c, context=8, num_chars=3,
                                                beam_size=1)(None, (), prompt_C, length)
  assert data.BYTES.decode(one_M) == "bda"
  np.testing.assert_allclose(float(one_log_prob), np.log(0.6) + np.log(0.3), rtol=1e-6)


def test_filter_logits_keeps_top_k_and_the_top_p_nucleus():
  logits_1xV = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda cfg: set(np.flatnonzero(np.isfinite(sample.filter_logits(logits_1xV, cfg)[0])))
  assert kept(sample.SamplingConfig(top_k=2)) == {1, 3}
  assert kept(sample.SamplingConfig(top_p=0.75)) == {1, 3}  # 0.5 + 0.3 reaches 0.75.
  assert kept(sample.SamplingConfig(top_p=0.85)) == {1, 2, 3}
  assert kept(sample.SamplingConfig(top_p=0.1)) == {1}
  assert kept(sample.SamplingConfig(top_k=3, top_p=0.5)) == {1}
  draws = jax.vmap(lambda r: sample.choose(logits_1xV, r, sample.SamplingConfig(top_k=2)))(
      jax.random.split(jax.random.key(0), 500))
  assert set(np.asarray(draws).ravel()) == {1, 3}


def test_bad_sample_keys_raise_user_errors(tiny_config):
  for key, value in (("temperature", -1.0), ("top_k", V + 1), ("top_p", 0.0), ("beam_size", 0),
                     ("beam_size", V + 1)):
    config = tiny_config.copy_and_resolve_references()
    config.sample[key] = value
    with pytest.raises(UserError, match=f"config.sample.{key}"):
      sample.SamplingConfig.from_config(config, V)
  # Sampling's knobs with a beam search: one line naming the knob.
  for key, value in (("temperature", 0.0), ("temperature", 0.8), ("top_k", 5), ("top_p", 0.9)):
    config = tiny_config.copy_and_resolve_references()
    config.sample.beam_size = 4
    config.sample[key] = value
    with pytest.raises(UserError, match=rf"^config.sample.{key}=.* is for sampling; with "
                                        r"config.sample.beam_size=4 \(beam search\) leave it at [^\n]*$"):
      sample.SamplingConfig.from_config(config, V)
  # Beam search reorders the fixed family's KV cache; Transformer-XL samples only.
  config = tiny_config.copy_and_resolve_references()
  config.model.family, config.sample.beam_size = "xl", 4
  with pytest.raises(UserError, match=r"^config.sample.beam_size=4: beam search runs on the fixed "
                                      r"family's KV cache; config.model.family=xl samples"):
    sample.SamplingConfig.from_config(config, V)


def test_text8_prompt_outside_the_alphabet_is_a_user_error():
  assert list(sample.encode_prompt(data.TEXT8, "ab z")) == [0, 1, 26, 25]
  with pytest.raises(UserError, match=r"config.sample.prompt: character 'T'"):
    sample.encode_prompt(data.TEXT8, "The")
  with pytest.raises(UserError, match="config.sample.prompt is empty"):
    sample.encode_prompt(data.BYTES, "")


def test_sample_mode_end_to_end(trained_workdir):
  workdir, overrides = trained_workdir
  args = [sys.executable, "-m", "chartx.main", "--config=configs/tiny.py", f"--workdir={workdir}", *overrides,
          "--mode=sample", "--config.sample.prompt=the model", "--config.sample.num_chars=80",
          "--config.sample.temperature=0"]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("the model") and len(proc.stdout.rstrip("\n")) > len("the model")
  beam = subprocess.run([*args[:-1], "--config.sample.beam_size=3"], cwd=ROOT, capture_output=True, text=True)
  assert beam.returncode == 0, beam.stderr
  assert beam.stdout.startswith("the model") and "beam search of 3, log-probability -" in beam.stderr
