"""Training batches planned from the pairs' lengths alone: bucketed under a token budget, or packed.

A plan lists, for each batch, its padded length and its rows, each row the indices of the pairs
it holds: one pair per row when bucketing, several when packing. Planning reads only the
[n, 2] lengths array, never the ids, so every process plans the same global batches cheaply and
then reads only the pairs of its own rows.

An epoch visits the usable pairs in a permutation drawn from (seed, epoch), cut into chunks of
`CHUNK` pairs; each chunk is planned on its own, from (seed, epoch, chunk) alone. Memory and the
time to the first batch therefore do not grow with the corpus, and a position (epoch, chunk,
batch) is enough to resume exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from jaxtyping import Int

from transformer.errors import UserError

CHUNK = 65_536  # pairs planned together: a few thousand batches of Multi30k, 1.5% of WMT14 en-de

Row = tuple[int, ...]  # indices of the pairs in one row; () is a padding row
PlannedBatch = tuple[int, list[Row]]  # (padded length, rows)
_Rows = TypeVar("_Rows", list[Row], np.ndarray)


def default_length_buckets(max_len: int) -> tuple[int, ...]:
  """Bucket boundaries 8, 16, 24, 32, 48, 64, 96, 128, ... below `max_len`, then it.

  Steps of 8 then of about 1.5x keep padding under ~33% with few shapes to compile.
  """
  candidates = [8] + [b for k in range(4, 20) for b in (2**k, 3 * 2 ** (k - 1))]
  return tuple(b for b in candidates if b < max_len) + (max_len,)


def rows_per_batch(length: int, tokens_per_batch: int, multiple: int) -> int:
  """The most rows of `length` tokens within the budget, a multiple of `multiple` (the
  data-parallel ways and processes, times the micro-batches of an update)."""
  rows = tokens_per_batch // length // multiple * multiple
  if rows == 0:
    raise UserError(
      f"data.tokens_per_batch={tokens_per_batch} cannot fit {multiple} rows of "
      f"length {length}: raise it to at least {multiple * length}, or lower "
      "data.max_len"
    )
  return rows


@dataclasses.dataclass(frozen=True)
class Layout:
  """The shapes of training batches.

  Attributes:
    max_len: the longest sequence (EOS included); with packing, every row's length.
    packing: several pairs per row (with segment ids), or one pair per row in length buckets.
    buckets: padded lengths, one batch shape each (packing: just max_len).
    rows: rows per batch of each bucket.
  """

  max_len: int
  packing: bool
  buckets: tuple[int, ...]
  rows: tuple[int, ...]

  @classmethod
  def of(
    cls,
    *,
    max_len: int,
    packing: bool,
    tokens_per_batch: int,
    multiple: int,
    buckets: Sequence[int] = (),
  ) -> Layout:
    buckets = (max_len,) if packing else tuple(sorted(buckets or default_length_buckets(max_len)))
    return cls(
      max_len,
      packing,
      buckets,
      tuple(rows_per_batch(b, tokens_per_batch, multiple) for b in buckets),
    )


def usable_pairs(
  lengths_n2: Int[np.ndarray, "n 2"], max_len: int, truncate: bool
) -> tuple[np.ndarray, dict[str, int]]:
  """Indices of the pairs training reads, and counts of those it leaves out.

  A pair is left out when a side is empty, or when a side with its EOS exceeds `max_len`
  (unless `truncate`, which cuts it instead).
  """
  empty = (lengths_n2 == 0).any(axis=1)
  too_long = lengths_n2.max(axis=1) + 1 > max_len
  keep = ~empty & (truncate | ~too_long)
  counts = {
    "pairs": len(lengths_n2),
    "empty": int(empty.sum()),
    "too_long": int((too_long & ~empty).sum()),
    "kept": int(keep.sum()),
  }
  return np.flatnonzero(keep), counts


def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of range(num), a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num).astype(np.int64)


def num_chunks(num: int) -> int:
  return max(-(-num // CHUNK), 1)


def plan_chunk(
  ids: np.ndarray, lengths_n2: np.ndarray, layout: Layout, rng: np.random.Generator
) -> list[PlannedBatch]:
  """The batches of one chunk of pairs (`ids`, in their shuffled order)."""
  if layout.packing:
    return pack(ids, lengths_n2, layout, rng)
  return bucket(ids, lengths_n2, layout, rng)


def bucket(
  ids: np.ndarray, lengths_n2: np.ndarray, layout: Layout, rng: np.random.Generator
) -> list[PlannedBatch]:
  """One pair per row; each pair in the smallest bucket that holds its longer side and EOS.
  A bucket's last batch is filled with padding rows; the batches are then shuffled."""
  need = np.minimum(lengths_n2[ids].max(axis=1) + 1, layout.max_len)
  which = np.searchsorted(np.asarray(layout.buckets), need, side="left")
  plan: list[PlannedBatch] = []
  for b, (length, rows) in enumerate(zip(layout.buckets, layout.rows, strict=True)):
    members = ids[which == b]
    for start in range(0, len(members), rows):
      batch = [(int(i),) for i in members[start : start + rows]]
      plan.append((length, batch + [()] * (rows - len(batch))))
  return [plan[i] for i in rng.permutation(len(plan))]


def pack(
  ids: np.ndarray, lengths_n2: np.ndarray, layout: Layout, rng: np.random.Generator
) -> list[PlannedBatch]:
  """Pairs packed best-fit-decreasing into rows of `max_len` source and target tokens.

  The chunk's pairs are taken longest first (by their longer side, EOS counted) and each goes
  into the open row with the least target room that still holds both its sides (rows are kept
  in lists by their target room, so the search stops at the first fit); a pair that fits
  nowhere opens a row. On Multi30k this leaves about 2% of the target slots empty (first fit in
  arrival order: 5-7%). The rows are then shuffled, so a batch mixes long and short pairs, and
  grouped into batches; the last is filled with padding rows.
  """
  length, rows_per = layout.max_len, layout.rows[0]
  need_n2 = np.minimum(lengths_n2[ids] + 1, length)
  longest_first = np.argsort(-need_n2.max(axis=1), kind="stable")
  rows: list[list] = []  # [source used, target used, [pair ids]]
  by_room: list[list[int]] = [[] for _ in range(length + 1)]  # target room -> open rows
  for pair, (s, t) in zip(
    ids[longest_first].tolist(), need_n2[longest_first].tolist(), strict=True
  ):
    chosen = _best_row(rows, by_room, s, t, length)
    if chosen is None:
      rows.append([s, t, [pair]])
      by_room[length - t].append(len(rows) - 1)
      continue
    row = rows[chosen]
    row[0], row[1] = row[0] + s, row[1] + t
    row[2].append(pair)
    by_room[length - row[1]].append(chosen)
  order = rng.permutation(len(rows))
  plan: list[PlannedBatch] = []
  for start in range(0, len(rows), rows_per):
    batch: list[Row] = [tuple(rows[r][2]) for r in order[start : start + rows_per]]
    plan.append((length, batch + [()] * (rows_per - len(batch))))
  return plan


def _best_row(
  rows: list[list], by_room: list[list[int]], s: int, t: int, length: int
) -> int | None:
  """The open row with the least target room >= t whose source room is >= s, taken out of its
  room list; None if there is none."""
  for room in range(t, length + 1):
    candidates = by_room[room]
    for k in range(len(candidates) - 1, -1, -1):
      if rows[candidates[k]][0] + s <= length:
        return candidates.pop(k)
  return None


@functools.lru_cache(maxsize=2)
def _order(num: int, seed: int, epoch: int) -> np.ndarray:
  return epoch_order(num, seed, epoch)


def chunk_plan(
  usable: np.ndarray, lengths_n2: np.ndarray, layout: Layout, seed: int, epoch: int, chunk: int
) -> list[PlannedBatch]:
  """The batches of chunk `chunk` of epoch `epoch`: a pure function of its arguments."""
  order = usable[_order(len(usable), seed, epoch)]
  ids = order[chunk * CHUNK : (chunk + 1) * CHUNK]
  return plan_chunk(ids, lengths_n2, layout, np.random.default_rng([seed, epoch, chunk]))


@dataclasses.dataclass(frozen=True)
class Share:
  """This process's share of every global batch: rows [index * B / count, (index + 1) * B /
  count), so that the processes together read exactly what one process would."""

  index: int = 0
  count: int = 1

  def rows(self, rows: _Rows) -> _Rows:
    """This process's contiguous slice of a global batch's rows (a list or an array)."""
    if len(rows) % self.count:
      raise UserError(
        f"a batch of {len(rows)} rows does not split over {self.count} processes: make the "
        "batch size (data.tokens_per_batch / data.max_len, data.eval_batch_size) a multiple "
        "of the process count"
      )
    size = len(rows) // self.count
    return rows[self.index * size : (self.index + 1) * size]
