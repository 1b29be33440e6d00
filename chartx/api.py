"""chartx.load(workdir): a trained run in Python (notebooks, other programs), restored as
--mode=eval and --mode=sample restore it (inference.restore, with the run's saved config), and
scored and sampled with the functions those modes use.

    import chartx
    run = chartx.load("/tmp/chartx_quickstart")
    run.score("def main():\\n")  # bits per character
    run.generate("def ", 80, temperature=0.8, seed=1)  # the continuation, without the prompt
    run.beam_search("def ", 80, beam_size=4)  # (the most likely continuation found, its log-probability)
"""

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np

from chartx import config as config_lib
from chartx import data, evaluate, inference, run_config, sample
from chartx.errors import UserError
from chartx.families import base


@dataclasses.dataclass
class Run:
  """A trained run's model restored from its workdir (chartx.load)."""
  config: ml_collections.ConfigDict  # The run's saved config.
  vocab: data.Vocab
  restored: inference.Restored  # Its model as evaluation runs it (inference.inference_model).
  _evaluator: evaluate.Evaluator
  # Compiled once per length and sampling (or beam size).
  _generators: dict[tuple[Any, ...], Callable[..., Any]] = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> Any:
    return self.restored.model

  @property
  def params(self) -> Any:
    return self.restored.params

  @property
  def step(self) -> int:
    return self.restored.step

  def score(self, text: str, stride: int | None = None) -> float:
    """The bits per character of text (every character but the first, which nothing predicts),
    by the run's eval protocol: the fixed family's windows of data.seq_len sliding by `stride`
    (default: the run's eval.stride; 1 is the paper's protocol), or Transformer-XL's recurrence
    over eval.batch_size streams of the text (no stride). Raises UserError for a character
    outside the vocabulary."""
    ids_M = self.vocab.encode(text, source="score's text")
    if len(ids_M) < 2:
      raise UserError(f"score's text has {len(ids_M)} characters; a score needs at least 2")
    if stride is not None:
      if not isinstance(self.restored.protocol, base.SlidingWindow):
        raise UserError(f"stride={stride} is the fixed family's sliding window; this run "
                        f"(model.family={self.config.model.family}) evaluates recurrently")
      if not 1 <= stride <= self.config.data.seq_len:
        raise UserError(f"stride={stride} must be in [1, data.seq_len={self.config.data.seq_len}]")
    bits, count = self._evaluator(self.params, ids_M, stride=stride)
    return bits / count

  def generate(self, prompt: str, num_chars: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> str:
    """num_chars characters continuing prompt (without it), drawn as --mode=sample draws them:
    temperature 0 is greedy, top_k 0 and top_p 1 keep every character."""
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.sample.update(prompt=prompt, num_chars=num_chars, temperature=float(temperature),
                         top_k=top_k, top_p=float(top_p), seed=seed, beam_size=1)
    prompt_ids, sampling = sample.check_config(config, self.vocab)  # The sample keys' own checks.
    key = (num_chars, sampling)
    if key not in self._generators:
      self._generators[key] = sample.model_generator(self.restored, context=config.data.seq_len,
                                                     num_chars=num_chars, sampling=sampling)
    return self.vocab.decode(self._generators[key](prompt_ids, seed))

  def beam_search(self, prompt: str, num_chars: int, beam_size: int = 4) -> tuple[str, float]:
    """(continuation, log-probability in nats): the most likely num_chars characters after prompt
    that a beam search of beam_size finds, as --mode=sample with sample.beam_size finds them
    (beam_size 1 is greedy decoding)."""
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.sample.update(prompt=prompt, num_chars=num_chars, temperature=1.0, top_k=0, top_p=1.0,
                         beam_size=beam_size)
    prompt_ids, _ = sample.check_config(config, self.vocab)
    key = ("beam", num_chars, beam_size)
    if key not in self._generators:
      self._generators[key] = sample.model_beam_search(self.restored, context=config.data.seq_len,
                                                       num_chars=num_chars, beam_size=beam_size)
    ids_M, log_prob = self._generators[key](prompt_ids)
    return self.vocab.decode(ids_M), log_prob


def load(workdir: str, *, step: int | None = None, best: bool = False) -> Run:
  """The run in workdir, restored with its saved config: its newest checkpoint, checkpoint
  `step`, or (best=True) the one with the lowest validation bpc. Raises UserError if workdir
  has no saved config or no such checkpoint."""
  config = run_config.get_config(workdir)
  config.eval.update(step=-1 if step is None else step, best=best)
  config_lib.check(config)
  vocab = data.vocab_for(config.data)
  restored = inference.restore(config, workdir, vocab.size)  # Builds the model, once.
  evaluator = evaluate.Evaluator(restored.model, restored.protocol, restored.mesh, restored.rules,
                                 config.eval.batch_size)
  return Run(config=config, vocab=vocab, restored=restored, _evaluator=evaluator)
