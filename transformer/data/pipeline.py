"""Token ids -> padded numpy batches for training and evaluation.

Training batches for translation are bucketed by length under a token budget; each epoch's
batches are a pure function of (seed, epoch), so a run resumed from `state()` sees exactly the
batches an uninterrupted run would. Every process builds the same global batch and keeps its own
slice of rows, so the union over processes is the single-process batch.

Batches are dicts of numpy int32 arrays padded with PAD_ID (0):
  translation:  {"inputs": [B, S], "targets": [B, T]}
  evaluation:   the same plus {"weights": [B] float32 (0 for padding rows), "index": [B] int32}
  language model: {"targets": [B, T]}
  masked LM:    {"inputs": [B, T], "targets": [B, T], "weights": [B, T] float32}
Targets are not shifted: the model builds its decoder input (BOS + targets[:-1]) itself.
Rows made only of padding (weight 0, index -1) fill the last batch of a bucket or of an
evaluation set, so every batch of a bucket has the same shape and each shape compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from jaxtyping import Int

from transformer.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, Tokenizer

Batch = dict[str, np.ndarray]
# One planned batch: its padded length and the global row indices (-1 = a padding row).
PlannedBatch = tuple[int, Int[np.ndarray, " B"]]

_PADDING_ROW = -1


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenized pairs ready for batching: each sequence ends with EOS.

  Attributes:
    inputs: source ids per example, each [S_i] int32.
    targets: target ids per example, each [T_i] int32.
    index: [n] int32, the position of each example among the pairs it was made from.
  """

  inputs: list[np.ndarray]
  targets: list[np.ndarray]
  index: np.ndarray

  def __len__(self) -> int:
    return len(self.inputs)

  def lengths(self) -> Int[np.ndarray, " n"]:
    """max(S_i, T_i) per example: source and target share a bucket's padded length."""
    return np.array(
      [max(len(s), len(t)) for s, t in zip(self.inputs, self.targets)], dtype=np.int32
    )


@dataclasses.dataclass(frozen=True)
class LengthStats:
  """How many pairs `make_examples` kept, dropped for length, and truncated."""

  kept: int
  dropped: int
  truncated: int


def encode_pairs(
  tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[list[int]]]:
  """(source ids, target ids) of (source, target) text pairs, without EOS."""
  return (tokenizer.encode([src for src, _ in pairs]), tokenizer.encode([tgt for _, tgt in pairs]))


def make_examples(
  source_ids: Sequence[Sequence[int]],
  target_ids: Sequence[Sequence[int]],
  max_length: int,
  *,
  truncate: bool = False,
) -> tuple[Examples, LengthStats]:
  """Appends EOS to both sides and drops (or truncates) pairs longer than `max_length`.

  Truncation keeps EOS as the last token, so every sequence still ends the way the decoder is
  taught to stop. Use `truncate=True` for evaluation sets, whose every line needs a translation.
  """
  if len(source_ids) != len(target_ids):
    raise ValueError(f"{len(source_ids)} source but {len(target_ids)} target sequences.")
  inputs, targets, index = [], [], []
  dropped = truncated = 0
  for i, (src, tgt) in enumerate(zip(source_ids, target_ids)):
    too_long = max(len(src), len(tgt)) + 1 > max_length
    if too_long and not truncate:
      dropped += 1
      continue
    truncated += too_long
    inputs.append(_with_eos(src, max_length))
    targets.append(_with_eos(tgt, max_length))
    index.append(i)
  stats = LengthStats(kept=len(index), dropped=dropped, truncated=truncated)
  logging.info(
    "Examples longer than %d tokens: %d dropped, %d truncated, %d kept.",
    max_length,
    stats.dropped,
    stats.truncated,
    stats.kept,
  )
  return Examples(inputs, targets, np.array(index, dtype=np.int32)), stats


def _with_eos(ids: Sequence[int], max_length: int) -> np.ndarray:
  return np.array(list(ids[: max_length - 1]) + [EOS_ID], dtype=np.int32)


def default_length_buckets(max_length: int) -> tuple[int, ...]:
  """Bucket boundaries 8, 16, 24, 32, 48, 64, 96, 128, ... below `max_length`, then it.

  Steps of 8 then of about 1.5x keep padding under ~33% with few shapes to compile.
  """
  candidates = [8] + [b for k in range(4, 20) for b in (2**k, 3 * 2 ** (k - 1))]
  return tuple(b for b in candidates if b < max_length) + (max_length,)


def bucket_batch_sizes(
  length_buckets: Sequence[int], tokens_per_batch: int, batch_multiple: int
) -> tuple[int, ...]:
  """Rows per batch for each bucket: the largest multiple of `batch_multiple` with
  rows * boundary <= tokens_per_batch (the budget counts padded tokens of one side)."""
  sizes = tuple(tokens_per_batch // b // batch_multiple * batch_multiple for b in length_buckets)
  if min(sizes) == 0:
    raise ValueError(
      f"tokens_per_batch={tokens_per_batch} cannot fit {batch_multiple} rows of "
      f"length {max(length_buckets)}; raise it or lower max_length."
    )
  return sizes


def assign_buckets(
  lengths: Int[np.ndarray, " n"], length_buckets: Sequence[int] | np.ndarray
) -> np.ndarray:
  """[n] index of the smallest boundary >= each length."""
  buckets = np.searchsorted(np.asarray(length_buckets), lengths, side="left")
  if lengths.size and buckets.max() == len(length_buckets):
    raise ValueError(
      f"An example has {lengths.max()} tokens, more than the largest "
      f"bucket {max(length_buckets)}; filter with make_examples first."
    )
  return buckets


def _chunk(rows: np.ndarray, size: int) -> list[np.ndarray]:
  """Splits rows into batches of `size`, the last one filled with padding rows."""
  filled = np.full(-(-len(rows) // size) * size, _PADDING_ROW, dtype=np.int64)
  filled[: len(rows)] = rows
  return list(filled.reshape(-1, size))


def bucketed_epoch_plan(
  buckets: Int[np.ndarray, " n"],
  length_buckets: Sequence[int],
  batch_sizes: Sequence[int],
  seed: int,
  epoch: int,
) -> list[PlannedBatch]:
  """The batches of one epoch: examples shuffled within buckets, then batches shuffled.

  A pure function of its arguments: the rng is seeded by (seed, epoch) alone.
  """
  rng = np.random.default_rng([seed, epoch])
  plan = []
  for b, (length, size) in enumerate(zip(length_buckets, batch_sizes)):
    members = rng.permutation(np.flatnonzero(buckets == b))
    plan += [(length, rows) for rows in _chunk(members, size)]
  return [plan[i] for i in rng.permutation(len(plan))]


def padded(
  sequences: Sequence[Sequence[int] | np.ndarray], length: int | None = None
) -> Int[np.ndarray, "B T"]:
  """Sequences of ids as one [B, T] int32 array right-padded with PAD_ID; T = `length`, or the
  longest sequence."""
  length = max((len(s) for s in sequences), default=0) if length is None else length
  out = np.full((len(sequences), length), PAD_ID, dtype=np.int32)
  for r, sequence in enumerate(sequences):
    out[r, : len(sequence)] = sequence
  return out


def pad_rows(
  sequences: Sequence[np.ndarray] | np.ndarray, rows: Int[np.ndarray, " B"], length: int
) -> Int[np.ndarray, "B T"]:
  """sequences[rows] right-padded with PAD_ID to `length`; row -1 is all padding."""
  return padded([sequences[row] if row != _PADDING_ROW else () for row in rows], length)


def process_rows(rows: Int[np.ndarray, " B"], process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous slice [B / process_count] of a global batch's rows."""
  if len(rows) % process_count:
    raise ValueError(
      f"Global batch of {len(rows)} rows does not split over "
      f"{process_count} processes; make batch_multiple a multiple of it."
    )
  per_process = len(rows) // process_count
  return rows[process_index * per_process : (process_index + 1) * per_process]


class BatchIterator(Iterator[Batch]):
  """Infinite iterator over epochs of planned batches, resumable from `state()`.

  Args:
    plan: epoch -> that epoch's global batches; must be a pure function of the epoch.
    build: (padded length, this process's rows) -> batch dict.
    process_index, process_count: which slice of each global batch this process gets.
  """

  def __init__(
    self,
    plan: Callable[[int], list[PlannedBatch]],
    build: Callable[[int, np.ndarray], Batch],
    *,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    self._plan, self._build = plan, build
    self._process_index, self._process_count = process_index, process_count
    self._epoch, self._batch_index = 0, 0
    self._cached: tuple[int, list[PlannedBatch]] | None = None

  def _epoch_plan(self, epoch: int) -> list[PlannedBatch]:
    if self._cached is None or self._cached[0] != epoch:
      self._cached = (epoch, self._plan(epoch))
    return self._cached[1]

  @property
  def batches_per_epoch(self) -> int:
    return len(self._epoch_plan(self._epoch))

  def __next__(self) -> Batch:
    plan = self._epoch_plan(self._epoch)
    if not plan:
      raise ValueError("No examples to batch.")
    length, rows = plan[self._batch_index]
    self._batch_index += 1
    if self._batch_index == len(plan):  # Keep state() canonical: never "end of epoch e".
      self._epoch, self._batch_index = self._epoch + 1, 0
    return self._build(length, process_rows(rows, self._process_index, self._process_count))

  def state(self) -> dict[str, int]:
    """JSON-serializable position: the epoch and index of the next batch."""
    return {"epoch": self._epoch, "batch_index": self._batch_index}

  def restore(self, state: dict[str, int]) -> None:
    """Continues from a `state()`: the next batch is the one that followed it."""
    epoch, batch_index = int(state["epoch"]), int(state["batch_index"])
    if not 0 <= batch_index < max(len(self._epoch_plan(epoch)), 1):
      raise ValueError(f"batch_index {batch_index} out of range for epoch {epoch}.")
    self._epoch, self._batch_index = epoch, batch_index


def _build_translation(examples: Examples, length: int, rows: np.ndarray) -> Batch:
  return {
    "inputs": pad_rows(examples.inputs, rows, length),
    "targets": pad_rows(examples.targets, rows, length),
  }


def translation_train_batches(
  examples: Examples,
  *,
  tokens_per_batch: int,
  seed: int,
  length_buckets: Sequence[int] | None = None,
  batch_multiple: int = 1,
  process_index: int = 0,
  process_count: int = 1,
) -> BatchIterator:
  """Shuffled, length-bucketed training batches {"inputs": [B, S], "targets": [B, T]}.

  Each example appears once per epoch. S = T = the bucket boundary, B * S <= tokens_per_batch
  and B is a multiple of `batch_multiple` (the data-parallel device count), so the number of
  shapes is at most len(length_buckets). Per process, B is divided by `process_count`.
  """
  if length_buckets is None:
    length_buckets = default_length_buckets(int(examples.lengths().max(initial=8)))
  length_buckets = tuple(sorted(length_buckets))
  sizes = bucket_batch_sizes(length_buckets, tokens_per_batch, batch_multiple)
  plan = functools.partial(
    bucketed_epoch_plan,
    assign_buckets(examples.lengths(), length_buckets),
    length_buckets,
    sizes,
    seed,
  )
  return BatchIterator(
    plan,
    functools.partial(_build_translation, examples),
    process_index=process_index,
    process_count=process_count,
  )


def eval_batches(
  examples: Examples,
  batch_size: int,
  *,
  length_buckets: Sequence[int] | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> list[Batch]:
  """Evaluation batches in example order, each padded to a bucket boundary.

  Returns:
    Dicts with "inputs" [B, S], "targets" [B, T] int32, "weights" [B] float32 (1 for real rows,
    0 for the padding rows that fill the last batch) and "index" [B] int32 (the example's
    position in the original pairs, -1 for padding rows), B = batch_size / process_count.
  """
  if length_buckets is None:
    length_buckets = default_length_buckets(int(examples.lengths().max(initial=8)))
  boundaries = np.asarray(sorted(length_buckets))
  lengths = examples.lengths()
  batches = []
  for rows in _chunk(np.arange(len(examples)), batch_size):
    real = rows[rows != _PADDING_ROW]
    length = int(boundaries[assign_buckets(lengths[real], boundaries).max()])
    local = process_rows(rows, process_index, process_count)
    batch = _build_translation(examples, length, local)
    batch["weights"] = (local != _PADDING_ROW).astype(np.float32)
    batch["index"] = np.where(local != _PADDING_ROW, examples.index[local], -1).astype(np.int32)
    batches.append(batch)
  return batches


def lm_windows(token_ids: Sequence[Sequence[int]], seq_len: int) -> Int[np.ndarray, "n T"]:
  """One side's sentences joined with EOS after each, cut into windows of T = seq_len.

  The last window is right-padded with PAD_ID so no text is lost.
  """
  stream = np.fromiter((i for ids in token_ids for i in (*ids, EOS_ID)), dtype=np.int32)
  filled = np.full(-(-stream.size // seq_len) * seq_len, PAD_ID, dtype=np.int32)
  filled[: stream.size] = stream
  return filled.reshape(-1, seq_len)  # [n windows, T]


def _shuffled_plan(
  num_rows: int, seq_len: int, batch_size: int, seed: int, epoch: int
) -> list[PlannedBatch]:
  rows = np.random.default_rng([seed, epoch]).permutation(num_rows)
  return [(seq_len, batch_rows) for batch_rows in _chunk(rows, batch_size)]


def _build_lm(windows: np.ndarray, length: int, rows: np.ndarray) -> Batch:
  return {"targets": pad_rows(windows, rows, length)}


def lm_train_batches(
  token_ids: Sequence[Sequence[int]],
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> BatchIterator:
  """Shuffled decoder-only LM batches {"targets": [B, T]} of `lm_windows`, resumable.

  `batch_size` is global; each process gets batch_size / process_count rows.
  """
  windows = lm_windows(token_ids, seq_len)
  plan = functools.partial(_shuffled_plan, len(windows), seq_len, batch_size, seed)
  return BatchIterator(
    plan,
    functools.partial(_build_lm, windows),
    process_index=process_index,
    process_count=process_count,
  )


def mask_tokens(
  ids_BT: Int[np.ndarray, "B T"],
  rng: np.random.Generator,
  vocab_size: int,
  *,
  select_rate: float = 0.15,
  mask_rate: float = 0.8,
  random_rate: float = 0.1,
  process_index: int = 0,
  process_count: int = 1,
) -> dict[str, np.ndarray]:
  """BERT's masked-LM corruption of a batch.

  Each non-special token is selected with probability `select_rate`; a selected token becomes
  MASK_ID with probability `mask_rate`, a random ordinary token with `random_rate`, and stays
  itself otherwise (BERT's 80/10/10). For a resumable run seed `rng` with (seed, step).

  With `process_count` > 1, `ids_BT` is this process's slice of a global batch of
  B * process_count rows (as `process_rows` cuts it): the random draws are made for the whole
  global batch and sliced the same way, so the processes' batches together are the batch one
  process would corrupt. Every process must seed `rng` alike.

  Returns:
    {"inputs": [B, T] corrupted ids, "targets": [B, T] original ids,
     "weights": [B, T] float32, 1 at selected positions (the only ones the loss counts)}.
  """
  ids_BT = np.asarray(ids_BT, dtype=np.int32)
  rows, length = ids_BT.shape
  global_shape = (rows * process_count, length)
  local = slice(process_index * rows, (process_index + 1) * rows)
  special = np.isin(ids_BT, [PAD_ID, BOS_ID, EOS_ID, MASK_ID])
  selected = (rng.random(global_shape)[local] < select_rate) & ~special
  action = rng.random(global_shape)[local]
  # Ordinary pieces start after the reserved ids; replacing with a special id would leak them.
  random_ids = rng.integers(MASK_ID + 1, vocab_size, size=global_shape, dtype=np.int32)[local]
  inputs = np.where(selected & (action < mask_rate), MASK_ID, ids_BT)
  inputs = np.where(
    selected & (action >= mask_rate) & (action < mask_rate + random_rate), random_ids, inputs
  )
  return {
    "inputs": inputs.astype(np.int32),
    "targets": ids_BT,
    "weights": selected.astype(np.float32),
  }
