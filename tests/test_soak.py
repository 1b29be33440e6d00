"""benchmarks/soak.py, short: a run stopped twice by SIGKILL or SIGTERM (which must exit 0), at
a random step or during a save, ends bitwise where an uninterrupted run ends. Its own file: with
pytest-xdist's --dist loadfile it runs beside tests/test_failures.py, not after it."""

import pytest

from benchmarks import soak


@pytest.mark.parametrize("family", ["fixed", "xl"])
def test_a_soak_of_kills_and_sigterms_at_random_points_resumes_bitwise(tmp_path, family):
  """2 stops from seed 0 (the benchmark's run is 10): a SIGTERM and a SIGKILL in each family.
  30 steps leave room for both stops (each within 10 steps of the last) and halve the saves of
  the benchmark's 60."""
  record = soak.soak(str(tmp_path), family, cycles=2, seed=0, num_steps=30)
  assert [stop["signal"] for stop in record["stops"]] in (["SIGTERM", "SIGKILL"],
                                                          ["SIGKILL", "SIGTERM"])
  assert record["bitwise_equal"], record
