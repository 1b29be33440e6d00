"""chartx.load: README's example runs; score() is the bpc evaluation computes; generate() is what
--mode=sample draws."""

import os
import re

import ml_collections
import numpy as np
import pytest

import chartx
from chartx import data, metrics, sample
from chartx.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(trained_workdir):
  return chartx.load(trained_workdir[0])


def test_readme_example_runs(trained_workdir, capsys):
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    section = f.read().split("## Python API", 1)[1].split("\n## ", 1)[0]
  (block,) = re.findall(r"\n\n((?:    .*\n|\n)+)", section)[:1]
  code = "\n".join(line[4:] for line in block.splitlines())
  assert "chartx.load(" in code and ".score(" in code and ".generate(" in code
  exec(code.replace("/tmp/chartx_quickstart", trained_workdir[0]), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert re.search(r"^step 20, 2 layers, vocabulary of 256\n\d+\.\d{3} bpc; def ", out), out


def test_score_is_the_validation_bpc_of_the_same_text(run, trained_workdir):
  workdir, _ = trained_workdir
  corpus = data.load_corpus(run.config.data)
  text = run.vocab.decode(data.eval_stream(corpus, "validation")[:run.config.eval.max_chars])
  (logged,) = [r for r in metrics.read_metrics(workdir) if "validation_bpc" in r]
  np.testing.assert_allclose(run.score(text), logged["validation_bpc"], rtol=1e-5)
  assert run.score(text[:5]) != run.score(text[:6])
  with pytest.raises(UserError, match="a score needs at least 2"):
    run.score("a")


def test_generate_is_what_sample_mode_draws(run, trained_workdir):
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.sample.update(prompt="the model", num_chars=40, temperature=0.7, top_k=5, seed=3)
  printed = sample.sample_checkpoint(config, trained_workdir[0])
  text = run.generate("the model", 40, temperature=0.7, top_k=5, seed=3)
  assert text and printed == "the model" + text
  greedy = run.generate("the model", 40, temperature=0)
  assert greedy == run.generate("the model", 40, temperature=0, seed=7)  # Greedy ignores the seed.
  with pytest.raises(UserError, match=r"config.sample.top_k must be in \[0, 256\]"):
    run.generate("the", 5, top_k=300)


def test_beam_search_is_what_sample_mode_finds(run, trained_workdir, capsys):
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.sample.update(prompt="the ", num_chars=12, temperature=1.0, top_k=0, top_p=1.0, beam_size=3)
  printed = sample.sample_checkpoint(config, trained_workdir[0])
  text, log_prob = run.beam_search("the ", 12, beam_size=3)
  assert printed == "the " + text and log_prob < 0
  assert f"log-probability {log_prob:.4f} nats" in capsys.readouterr().err
  greedy, _ = run.beam_search("the ", 12, beam_size=1)
  assert greedy == run.generate("the ", 12, temperature=0)


def test_load_a_given_checkpoint_or_none(trained_workdir, tmp_path):
  assert chartx.load(trained_workdir[0], step=10).step == 10
  with pytest.raises(UserError, match="no saved config"):
    chartx.load(str(tmp_path))
