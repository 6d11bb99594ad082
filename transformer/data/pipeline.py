"""Evaluation batches, and the pieces they share with training: EOS, padding, masked-LM corruption.

Evaluation batches keep the split's order and are padded to a length bucket; rows made only of
padding (weight 0, index -1) fill the last batch, and every process keeps its own slice of each
batch's rows, so the union over processes is the single-process batch. They are dicts of int32
numpy arrays padded with PAD_ID (0): {"inputs": [B, S], "targets": [B, T], "weights": [B]
float32, "index": [B]}. Targets are not shifted: the model builds its decoder input itself.
Training batches are planned in `transformer.data.batching` and streamed by
`transformer.data.stream`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from jaxtyping import Int

from transformer.data.batching import Share, default_length_buckets
from transformer.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, Tokenizer

Batch = dict[str, np.ndarray]

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
  source_ids: Sequence[Sequence[int | np.integer] | np.ndarray],
  target_ids: Sequence[Sequence[int | np.integer] | np.ndarray],
  max_len: int,
  *,
  truncate: bool = False,
) -> tuple[Examples, LengthStats]:
  """Appends EOS to both sides and drops (or truncates) pairs longer than `max_len`.

  Truncation keeps EOS as the last token, so every sequence still ends the way the decoder is
  taught to stop. Use `truncate=True` for evaluation sets, whose every line needs a translation.
  """
  if len(source_ids) != len(target_ids):
    raise ValueError(f"{len(source_ids)} source but {len(target_ids)} target sequences.")
  inputs, targets, index = [], [], []
  dropped = truncated = 0
  for i, (src, tgt) in enumerate(zip(source_ids, target_ids)):
    too_long = max(len(src), len(tgt)) + 1 > max_len
    if too_long and not truncate:
      dropped += 1
      continue
    truncated += too_long
    inputs.append(_with_eos(src, max_len))
    targets.append(_with_eos(tgt, max_len))
    index.append(i)
  stats = LengthStats(kept=len(index), dropped=dropped, truncated=truncated)
  logging.getLogger(__name__).debug(
    "Examples longer than %d tokens: %d dropped, %d truncated, %d kept.",
    max_len,
    stats.dropped,
    stats.truncated,
    stats.kept,
  )
  return Examples(inputs, targets, np.array(index, dtype=np.int32)), stats


def _build_translation(examples: Examples, length: int, rows: np.ndarray) -> Batch:
  return {
    "inputs": pad_rows(examples.inputs, rows, length),
    "targets": pad_rows(examples.targets, rows, length),
  }


def _with_eos(ids: Sequence[int | np.integer] | np.ndarray, max_len: int) -> np.ndarray:
  kept = np.asarray(ids[: max_len - 1], np.int32)
  return np.concatenate([kept, np.array([EOS_ID], np.int32)])


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


def padded(
  sequences: Sequence[Sequence[int | np.integer] | np.ndarray], length: int | None = None
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
    local = Share(process_index, process_count).rows(rows)
    batch = _build_translation(examples, length, local)
    batch["weights"] = (local != _PADDING_ROW).astype(np.float32)
    batch["index"] = np.where(local != _PADDING_ROW, examples.index[local], -1).astype(np.int32)
    batches.append(batch)
  return batches


def lm_windows(
  token_ids: Sequence[Sequence[int | np.integer] | np.ndarray], seq_len: int
) -> Int[np.ndarray, "n T"]:
  """One side's sentences joined with EOS after each, cut into windows of T = seq_len.

  The last window is right-padded with PAD_ID so no text is lost.
  """
  stream = np.fromiter((i for ids in token_ids for i in (*ids, EOS_ID)), dtype=np.int32)
  filled = np.full(-(-stream.size // seq_len) * seq_len, PAD_ID, dtype=np.int32)
  filled[: stream.size] = stream
  return filled.reshape(-1, seq_len)  # [n windows, T]


def running_ids(
  records: Sequence[Sequence[int | np.integer] | np.ndarray], line_breaks_are_text: bool
) -> Int[np.ndarray, " n"]:
  """A text split's records (`transformer.data.files`: lines, an empty record after each
  document) as one running text of ids.

  With a char or byte vocabulary (`line_breaks_are_text`) each line carries its own line break,
  so the records go end to end and each document end becomes EOS. SentencePiece drops line
  breaks, so there EOS follows every line as well as every document.
  """
  lengths = np.fromiter((len(r) for r in records), np.int64, len(records))
  eos_after = (lengths == 0) | (not line_breaks_are_text)
  out = np.full(int(lengths.sum() + eos_after.sum()), EOS_ID, np.int32)
  starts = np.cumsum(lengths + eos_after) - lengths - eos_after
  for start, record in zip(starts.tolist(), records, strict=True):
    out[start : start + len(record)] = record
  return out


def running_windows(ids: Int[np.ndarray, " n"], length: int) -> Int[np.ndarray, "w L"]:
  """[w, length + 1] windows of running text, each starting `length` ids after the one before:
  a window's inputs are w[:-1] and its targets w[1:], so every id after the first is a target
  exactly once and reads its real predecessors (nanoGPT's and GPT-2's layout). The last window
  is right-padded with PAD_ID (a target of 0 weighs nothing)."""
  count = max(-(-(len(ids) - 1) // length), 0)
  filled = np.full(count * length + 1, PAD_ID, np.int32)
  filled[: len(ids)] = ids
  starts = np.arange(count) * length
  return filled[starts[:, None] + np.arange(length + 1)]


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
  B * process_count rows (as `Share.rows` cuts it): the random draws are made for the whole
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
