"""Training batches, each a pure function of the step, so resuming at step s needs no iterator state.

  train_batch: windows at uniformly random positions, drawn from (seed, step) (the fixed family);
  stream_batch: the next segment of each of B contiguous streams of the split (Transformer-XL,
    whose memory carries each stream from one step to the next).
"""

import numpy as np

from chartx.errors import UserError


def _check_rows(batch_size: int, process_index: int, process_count: int) -> int:
  """This process's number of rows of the global batch."""
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(f"train.batch_size={batch_size} must be a positive multiple of the "
                    f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is outside [0, {process_count})")
  return batch_size // process_count


def train_batch(ids_M: np.ndarray, *, seed: int, step: int, batch_size: int, length: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This process's rows of the global batch for `step`: int32 [batch_size // process_count, length].

  Every process draws all batch_size start positions from the same generator and keeps its
  own rows, so the slices of processes 0..P-1 concatenate to the global batch, which depends on
  (seed, step) only: resuming at step s needs no iterator state.
  """
  rows = _check_rows(batch_size, process_index, process_count)
  num_chars = len(ids_M)
  if length <= 0 or length > num_chars:
    raise UserError(f"training windows of {length} characters (data.seq_len plus the extra targets) "
                    f"do not fit in the training split of {num_chars} characters")
  rng = np.random.default_rng([seed, step])
  starts_B = rng.integers(0, num_chars - length + 1, size=batch_size)
  starts_B = starts_B[process_index * rows:(process_index + 1) * rows]  # This process's rows.
  return ids_M[starts_B[:, None] + np.arange(length)].astype(np.int32)


def segments_per_pass(num_chars: int, *, batch_size: int, seq_len: int, num_targets: int) -> int:
  """How many steps stream_batch takes to go through its streams once (then they start over).

  Stream b is characters [b L, (b + 1) L) of the split, L = num_chars // batch_size (the last
  num_chars % batch_size characters are left out); a segment is seq_len inputs and num_targets
  characters after them, so a stream holds (L - num_targets) // seq_len whole segments.
  """
  stream_len = num_chars // batch_size
  segments = (stream_len - num_targets) // seq_len if stream_len >= num_targets else 0
  if segments < 1:
    raise UserError(f"the training split of {num_chars:,} characters, cut into train.batch_size="
                    f"{batch_size} streams of {stream_len:,}, has no room for a segment of "
                    f"data.seq_len={seq_len} characters and {num_targets} target(s) after them")
  return segments


def stream_batch(ids_M: np.ndarray, *, step: int, batch_size: int, seq_len: int, num_targets: int,
                 process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(windows_BxS, reset_B): this process's rows of the segments of step `step`, S = seq_len +
  num_targets, int32, and per row whether its stream starts over here (its memory must be reset).

  The split is cut into batch_size contiguous streams (segments_per_pass); row b of every step is
  stream b. Step s takes segment s mod segments_per_pass of each stream: its seq_len inputs start
  seq_len characters after the previous step's, so step s + 1 continues the text of step s, and
  the num_targets characters after the inputs are the targets (consecutive windows overlap by
  them). After its last whole segment a stream starts over at its beginning; reset_B is True at
  those steps and at step 0. The batch depends on the step only (the seed plays no part: the
  streams are the split in order, as Transformer-XL trains), and processes 0..P-1 concatenate
  their rows to the global batch, as in train_batch.
  """
  rows = _check_rows(batch_size, process_index, process_count)
  segments = segments_per_pass(len(ids_M), batch_size=batch_size, seq_len=seq_len,
                               num_targets=num_targets)
  stream_len = len(ids_M) // batch_size
  segment = step % segments
  streams_B = np.arange(process_index * rows, (process_index + 1) * rows)
  starts_B = streams_B * stream_len + segment * seq_len
  windows_BxS = ids_M[starts_B[:, None] + np.arange(seq_len + num_targets)].astype(np.int32)
  return windows_BxS, np.full(rows, segment == 0)
