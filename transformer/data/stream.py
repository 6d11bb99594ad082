"""The training stream: Grain datasets from planned batches to padded or packed numpy batches.

  PlannedBatches    an `IterDataset` of global batch plans (`transformer.data.batching`), epoch
                    after epoch; its iterator's state is the position (epoch, chunk, batch)
  .map(assemble)    this process's rows, read from the token cache (`TokenCache.read`) or the
                    LM windows, padded or packed into arrays
  prefetch          `ThreadPrefetchIterDataset`: batches are assembled in a background thread
                    while the step runs; its state is that of the last batch handed out

`TrainStream` wraps the iterator with `state()` / `restore()` for the checkpoint: a resumed run
reads exactly the batches an uninterrupted one would, and every process's rows of a batch
together are the batch one process would read.

Batches are dicts of int32 numpy arrays padded with PAD_ID (0); targets are not shifted (the
model builds its decoder input itself):
  translation:  {"inputs": [B, S], "targets": [B, T]}, and when packed also
                "inputs_segments", "targets_segments" (1, 2, ... per pair in the row, 0 for
                padding) and "inputs_positions", "targets_positions" (from 0 in each pair)
  language model: {"targets": [B, T]}; on running text also "inputs" [B, T], the ids before
                the targets (`running_text_stream`)
  masked LM:    {"inputs": [B, T], "targets": [B, T], "weights": [B, T] float32}
"""

from __future__ import annotations

import atexit
import copy
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from transformer.data import batching
from transformer.data.batching import Layout, PlannedBatch, Row, Share
from transformer.data.pipeline import mask_tokens
from transformer.data.token_cache import TokenCache
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.errors import UserError

Batch = dict[str, np.ndarray]
Position = tuple[int, int, int]  # (epoch, chunk, batch)
# planner(epoch, chunk) -> that chunk's global batches
Planner = Callable[[int, int], list[PlannedBatch]]


class _PlanIterator(grain.DatasetIterator):
  """(position, global batch plan), epoch after epoch; resumable from `get_state()`."""

  def __init__(self, planner: Planner, chunks_per_epoch: int):
    super().__init__()
    self._planner, self._chunks = planner, chunks_per_epoch
    self._epoch = self._chunk = self._batch = 0
    self._cached: tuple[int, int, list[PlannedBatch]] | None = None

  def _plan(self) -> list[PlannedBatch]:
    if self._cached is None or self._cached[:2] != (self._epoch, self._chunk):
      self._cached = (self._epoch, self._chunk, self._planner(self._epoch, self._chunk))
    return self._cached[2]

  def __next__(self) -> tuple[Position, PlannedBatch]:
    empty_chunks = 0
    while self._batch >= len(self._plan()):
      empty_chunks += 1
      if empty_chunks > self._chunks:
        raise UserError("the training data holds no batch: check the data and data.max_len")
      self._batch, self._chunk = 0, self._chunk + 1
      if self._chunk == self._chunks:
        self._epoch, self._chunk = self._epoch + 1, 0
    position = (self._epoch, self._chunk, self._batch)
    self._batch += 1
    return position, self._plan()[position[2]]

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "chunk": self._chunk, "batch": self._batch}

  def set_state(self, state: dict[str, Any]) -> None:
    values = [
      state.get(k) if isinstance(state, dict) else None for k in ("epoch", "chunk", "batch")
    ]
    if not all(type(v) is int for v in values):  # {} would silently restart the stream
      raise UserError(
        f"data position {state} is not an (epoch, chunk, batch) of this stream: the "
        "checkpoint was written with other data, or its record was edited"
      )
    self._epoch, self._chunk, self._batch = (int(v) for v in values if v is not None)
    if not (self._epoch >= 0 and 0 <= self._chunk < self._chunks and self._batch >= 0):
      raise UserError(
        f"data position {state} is outside this stream ({self._chunks} chunks an "
        "epoch): the checkpoint was written with other data"
      )


class PlannedBatches(grain.IterDataset):
  """The global batch plans of every epoch, as a Grain dataset."""

  def __init__(self, planner: Planner, chunks_per_epoch: int):
    super().__init__()
    self._planner, self._chunks = planner, chunks_per_epoch

  def __iter__(self) -> _PlanIterator:
    return _PlanIterator(self._planner, self._chunks)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
  return np.cumsum(x) - x


def _lay_out(
  ids: np.ndarray,
  starts: np.ndarray,
  sizes: np.ndarray,
  rows_of: np.ndarray,
  packed: bool,
  length: int,
):
  """Where pieces of `ids` (piece k: ids[starts[k]:starts[k] + sizes[k]]) and an EOS after each
  go in a [rows, length] array: (flat indices, values, each token's position within its piece,
  each token's piece). Pieces of a row follow one another when `packed`; else each starts at
  column 0 of its row. A piece longer than fits (a truncated pair) is cut to leave room for EOS.
  """
  kept = np.minimum(sizes, length - 1)
  with_eos = kept + 1
  piece_of = np.repeat(np.arange(len(sizes)), with_eos)
  within = np.arange(int(with_eos.sum())) - _exclusive_cumsum(with_eos)[piece_of]
  eos = within == kept[piece_of]
  values = np.where(eos, EOS_ID, ids[np.minimum(starts[piece_of] + within, len(ids) - 1)])
  column = within
  if packed:  # after the pieces before it in its row
    before_in_row = (
      _exclusive_cumsum(with_eos)
      - _exclusive_cumsum(np.bincount(rows_of, with_eos).astype(np.int64))[rows_of]
    )
    column = within + before_in_row[piece_of]
  return rows_of[piece_of] * length + column, values, within, piece_of


def assemble_translation(cache: TokenCache, rows: list[Row], length: int, packed: bool) -> Batch:
  """The arrays of `rows` of pairs; with `packed` also each token's pair (segment, from 1) and
  position within its pair, so attention, positions and loss stay within a pair.

  Vectorized over the batch: the rows' records are read as one array, and every token's place
  is computed from the pairs' lengths, with no Python loop over pairs.
  """
  shape = (len(rows), length)
  batch = {key: np.full(shape, PAD_ID, np.int32) for key in ("inputs", "targets")}
  if packed:
    for key in ("inputs_segments", "targets_segments", "inputs_positions", "targets_positions"):
      batch[key] = np.zeros(shape, np.int32)
  pairs = np.array([i for row in rows for i in row], np.int64)
  if not pairs.size:
    return batch
  ids = cache.read_flat(pairs)
  lengths = cache.lengths[pairs].astype(np.int64)
  record_start = _exclusive_cumsum(lengths.sum(axis=1))
  per_row = np.array([len(row) for row in rows], np.int64)
  rows_of = np.repeat(np.arange(len(rows)), per_row)
  segment_of = np.arange(len(pairs)) - _exclusive_cumsum(per_row)[rows_of] + 1
  for side, key in ((0, "inputs"), (1, "targets")):
    starts = record_start + (lengths[:, 0] if side else 0)
    flat, values, within, piece_of = _lay_out(
      ids, starts, lengths[:, side], rows_of, packed, length
    )
    batch[key].ravel()[flat] = values
    if packed:
      batch[f"{key}_segments"].ravel()[flat] = segment_of[piece_of]
      batch[f"{key}_positions"].ravel()[flat] = within
  return batch


class TrainStream:
  """Infinite training batches of this process, prefetched, resumable from `state()`."""

  def __init__(self, dataset: grain.IterDataset, prefetch: int = 2):
    if prefetch:
      dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
    self._iterator: Any = iter(dataset)
    # Stopped before the interpreter tears down the modules its thread and finalizer use.
    atexit.register(self.close)

  def __iter__(self) -> TrainStream:
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def close(self) -> None:
    """Stops the prefetch thread; the stream cannot be read after."""
    iterator, self._iterator = self._iterator, None
    if iterator is not None:
      iterator.close()
      atexit.unregister(self.close)

  def state(self) -> dict[str, int]:
    """JSON-serializable position of the next batch."""
    return copy.deepcopy(self._iterator.get_state())

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a `state()`: the next batch is the one that followed it. A position of the
    earlier format {"epoch", "batch_index"} continues at that epoch's batch."""
    if "batch_index" in state:
      state = {"epoch": state["epoch"], "chunk": 0, "batch": state["batch_index"]}
    self._iterator.set_state(state)


def translation_stream(
  cache: TokenCache,
  usable: np.ndarray,
  layout: Layout,
  *,
  seed: int,
  share: Share = Share(),
  prefetch: int = 2,
) -> TrainStream:
  """Shuffled translation batches of `usable` pairs of `cache`, bucketed or packed."""

  def planner(epoch: int, chunk: int) -> list[PlannedBatch]:
    return batching.chunk_plan(usable, cache.lengths, layout, seed, epoch, chunk)

  def assemble(item: tuple[Position, PlannedBatch]) -> Batch:
    _, (length, rows) = item
    mine = share.rows(rows)
    return assemble_translation(cache, mine, length, layout.packing)

  plans = PlannedBatches(planner, batching.num_chunks(len(usable)))
  return TrainStream(plans.map(assemble), prefetch)


def language_model_stream(
  windows: np.ndarray,
  rows: int,
  *,
  seed: int,
  mlm: tuple | None = None,
  share: Share = Share(),
  prefetch: int = 2,
) -> TrainStream:
  """Shuffled batches of `rows` LM windows [n, T]; with `mlm` = (vocab_size, select_rate), BERT's
  corruption drawn for the global batch from (seed, position), so resuming is exact."""
  everything = np.arange(len(windows))

  def planner(epoch: int, chunk: int) -> list[PlannedBatch]:
    order = everything[batching.epoch_order(len(windows), seed, epoch)]
    ids = order[chunk * batching.CHUNK : (chunk + 1) * batching.CHUNK]
    batches = [[(int(i),) for i in ids[s : s + rows]] for s in range(0, len(ids), rows)]
    return [(windows.shape[1], b + [()] * (rows - len(b))) for b in batches]

  def assemble(item: tuple[Position, PlannedBatch]) -> Batch:
    position, (_, global_rows) = item
    mine = share.rows(global_rows)
    which = np.array([row[0] if row else -1 for row in mine], np.int64)
    targets = np.where((which >= 0)[:, None], windows[np.maximum(which, 0)], PAD_ID)
    targets = targets.astype(np.int32)
    if mlm is None:
      return {"targets": targets}
    vocab_size, select_rate = mlm
    rng = np.random.default_rng([seed, *position])
    return mask_tokens(
      targets,
      rng,
      vocab_size,
      select_rate=select_rate,
      process_index=share.index,
      process_count=share.count,
    )

  plans = PlannedBatches(planner, batching.num_chunks(len(windows)))
  return TrainStream(plans.map(assemble), prefetch)


def window_offset(seed: int, epoch: int, length: int) -> int:
  """Where epoch `epoch`'s windows start: 0 in the first epoch, then a draw from (seed, epoch),
  so later epochs cut the text elsewhere and each window meets new contexts."""
  return 0 if epoch == 0 else int(np.random.default_rng([seed, epoch, 7]).integers(length))


def running_text_stream(
  ids: np.ndarray,
  length: int,
  rows: int,
  *,
  seed: int,
  mlm: tuple | None = None,
  share: Share = Share(),
  prefetch: int = 2,
) -> TrainStream:
  """Shuffled batches of `rows` windows of the running text `ids` [n].

  Language model: windows of length + 1 ids, `length` apart, as {"inputs": w[:-1], "targets":
  w[1:]}: every position reads the ids before it, never a BOS. With `mlm` = (vocab_size,
  select_rate): windows of `length` ids, corrupted as `language_model_stream` does. Epoch e's
  windows start at `window_offset` and are visited in a permutation of (seed, e): a pure
  function of the position, so resuming is exact.
  """
  width = length if mlm else length + 1
  count = (len(ids) - width - (length - 1)) // length + 1
  if count < 1:
    raise UserError(
      f"the training text has {len(ids)} tokens, too few for a window of {width} (with room to "
      f"move it): give more text, or lower data.max_len={length}"
    )
  columns = np.arange(width)

  def planner(epoch: int, chunk: int) -> list[PlannedBatch]:
    order = batching.epoch_order(count, seed, epoch)[chunk * batching.CHUNK :][: batching.CHUNK]
    batches = [[(int(i),) for i in order[s : s + rows]] for s in range(0, len(order), rows)]
    return [(width, b + [()] * (rows - len(b))) for b in batches]

  def assemble(item: tuple[Position, PlannedBatch]) -> Batch:
    position, (_, global_rows) = item
    mine = share.rows(global_rows)
    which = np.array([row[0] if row else -1 for row in mine], np.int64)
    starts = window_offset(seed, position[0], length) + np.maximum(which, 0) * length
    windows = np.where((which >= 0)[:, None], ids[starts[:, None] + columns], PAD_ID)
    windows = windows.astype(np.int32)
    if mlm is None:
      return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
    vocab_size, select_rate = mlm
    return mask_tokens(
      windows,
      np.random.default_rng([seed, *position]),
      vocab_size,
      select_rate=select_rate,
      process_index=share.index,
      process_count=share.count,
    )

  plans = PlannedBatches(planner, batching.num_chunks(count))
  return TrainStream(plans.map(assemble), prefetch)
