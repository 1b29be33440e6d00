"""Training batches: windows at uniformly random positions, a pure function of (seed, step)."""

import numpy as np

from chartx.errors import UserError


def train_batch(ids_M: np.ndarray, *, seed: int, step: int, batch_size: int, length: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This process's rows of the global batch for `step`: int32 [batch_size // process_count, length].

  Every process draws all batch_size start positions from the same generator and keeps its
  own rows, so the slices of processes 0..P-1 concatenate to the global batch, which depends on
  (seed, step) only: resuming at step s needs no iterator state.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(f"train.batch_size={batch_size} must be a positive multiple of the "
                    f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is outside [0, {process_count})")
  num_chars = len(ids_M)
  if length <= 0 or length > num_chars:
    raise UserError(f"training windows of {length} characters (data.seq_len plus the extra targets) "
                    f"do not fit in the training split of {num_chars} characters")
  rng = np.random.default_rng([seed, step])
  starts_B = rng.integers(0, num_chars - length + 1, size=batch_size)
  rows = batch_size // process_count
  starts_B = starts_B[process_index * rows:(process_index + 1) * rows]  # This process's rows.
  return ids_M[starts_B[:, None] + np.arange(length)].astype(np.int32)
