"""train.profile_steps and chartx.bench --profile: a trace of the chosen steps where
TensorBoard's profile plugin looks, with step annotations; bad ranges are one-line errors."""

import glob
import os

import jax.numpy as jnp
import pytest

from chartx import config as config_lib
from chartx import loop, profiling
from chartx.tools import bench
from chartx.errors import UserError


def test_training_writes_an_annotated_trace_of_the_steps(tiny_config, tmp_path, capsys):
  (tmp_path / "text.txt").write_text("the profile of a step is in the trace. " * 200)
  tiny_config.data.path = str(tmp_path / "text.txt")
  tiny_config.train.update(num_steps=4, eval_every=0, checkpoint_every=0, profile_steps="1,3")
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir)
  (xplane,) = glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))
  with open(xplane, "rb") as f:
    trace = f.read()
  assert b"step_num" in trace  # jax.profiler.StepTraceAnnotation's.
  assert (f"train: profile of steps 1..2 in {os.path.join(workdir, 'plugins', 'profile')}"
          in capsys.readouterr().err)


@pytest.mark.parametrize("spec,expected", [("", None), ("0,5", (0, 5)), ("100, 105", (100, 105))])
def test_profile_steps_parse(spec, expected):
  assert profiling.parse_steps(spec) == expected


@pytest.mark.parametrize("spec", ["5", "5,5", "7,3", "a,b", "1,2,3", "-1,4"])
def test_bad_profile_steps_are_a_one_line_error(tiny_config, spec):
  tiny_config.train.profile_steps = spec
  with pytest.raises(UserError, match=r"config.train.profile_steps=.* must be \"START,STOP\""):
    config_lib.check(tiny_config)


def test_a_trace_still_running_when_the_loop_ends_is_written(tmp_path):
  with profiling.StepProfiler("0,10", str(tmp_path)) as profiler:  # The run stops at step 2.
    for step in range(2):
      with profiler.step(step):
        out = jnp.ones(4) * step
      profiler.done(step, out)
    assert not glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))
  assert glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))


def test_bench_profiles_its_timed_steps(tiny_config, tmp_path, capsys):
  record = bench.benchmark(tiny_config, steps=2, warmup=1, profile_dir=str(tmp_path))
  assert len(record["step_times_s"]) == 2
  (xplane,) = glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))
  with open(xplane, "rb") as f:
    assert b"bench" in f.read()
  assert "bench: profile of steps 1..2 in" in capsys.readouterr().err
