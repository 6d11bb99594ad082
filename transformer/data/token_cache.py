"""Token ids of a split, encoded once into ArrayRecord files and shared by every run that reads the
same text with the same tokenizer.

A cache is a directory named by a hash of (the split's text, the tokenizer file, the format):

  lengths.npy              [n, 2] int32: source and target pieces of each pair, EOS not included
  ids-00000.array_record   one record per pair: its source ids then its target ids (uint16 when
                           the vocabulary fits, else uint32), uncompressed, 64 records a group:
                           a read of a batch's records costs a few groups' decoding, and the
                           reader's index of groups stays small (one record a group made each
                           read of a 4.5M-pair file cost ~60 ms of index lookups)
  meta.json                pair count, dtype, pieces outside the vocabulary, what it was built from

It is built chunk by chunk (memory bounded by one chunk, whatever the split's size) into a temporary
directory that is renamed into place when complete, so a reader sees a whole cache or none, and
a build cut short leaves nothing behind but its temporary directory (removed by the next build).
Pairs stay in dataset order; empty or over-long pairs are left in and filtered by their lengths
when batches are planned, so evaluation pairs keep their line numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from transformer.data.tokenizer import UNK_ID
from transformer.errors import UserError

log = logging.getLogger(__name__)

# Version 2: records in groups of 64. ArrayRecordReader.read(indices) costs time in proportion to
# the file's chunk count on every call (53 ms for 4M single-record chunks, 0.8 ms in groups of
# 64..128, measured on 2 CPU cores), and a group of uncompressed records is cheap to read whole.
FORMAT_VERSION = 2
WRITER_OPTIONS = "group_size:64,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
META_FILENAME = "meta.json"
LENGTHS_FILENAME = "lengths.npy"
TEXT_FILENAME = "text.jsonl"


def cache_key(text_fingerprint: str, tokenizer_path: Path) -> str:
  """The name of the cache of one split's text encoded by one tokenizer model file."""
  digest = hashlib.sha256()
  digest.update(f"format {FORMAT_VERSION}\0{text_fingerprint}\0".encode())
  digest.update(Path(tokenizer_path).read_bytes())
  return digest.hexdigest()[:20]


@dataclasses.dataclass
class TokenCache:
  """A complete cache: the pairs' lengths in memory, their ids read on demand.

  Attributes:
    directory: the cache's folder.
    lengths: [n, 2] int32, the source and target pieces of each pair (EOS not included).
    meta: what meta.json records.
  """

  directory: Path
  lengths: np.ndarray
  meta: dict[str, Any]
  _readers: list | None = None
  _starts: np.ndarray | None = None  # first pair index of each shard

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.meta["dtype"])

  def _open(self) -> tuple[list, np.ndarray]:
    if self._readers is None:
      # One reader per shard, without read-ahead: training reads pairs in random order. (Reading
      # through `grain.sources.ArrayRecordDataSource` measured half this rate: it looks up each
      # key's shard in Python and hands every batch to a thread pool.)
      self._readers = [
        ArrayRecordReader(str(self.directory / name), READER_OPTIONS)
        for name in self.meta["shards"]
      ]
      sizes = [reader.num_records() for reader in self._readers]
      self._starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    assert self._starts is not None
    return self._readers, self._starts

  def read_flat(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """The ids of the pairs at `indices` end to end, each pair's source then its target, without
    EOS, in the cache's dtype; `lengths[indices]` tells where each piece starts."""
    indices = np.asarray(indices, np.int64)
    if not indices.size:
      return np.zeros((0,), self.dtype)
    readers, starts = self._open()
    shard_of = np.searchsorted(starts, indices, side="right") - 1
    if (shard_of == shard_of[0]).all():  # the common case: one shard, one read
      records = readers[shard_of[0]].read((indices - starts[shard_of[0]]).tolist())
    else:
      records = [b""] * len(indices)
      for shard in np.unique(shard_of).tolist():
        where = np.flatnonzero(shard_of == shard)
        positions = (indices[where] - starts[shard]).tolist()
        for k, record in zip(where.tolist(), readers[shard].read(positions), strict=True):
          records[k] = record
    return np.frombuffer(b"".join(records), self.dtype)

  def read(self, indices: Sequence[int] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(source ids, target ids) of the pairs at `indices`, without EOS, in the cache's dtype
    (read-only views: copy one to change it)."""
    indices = np.asarray(indices, np.int64)
    ids = self.read_flat(indices)
    lengths = self.lengths[indices]
    ends = np.cumsum(lengths.sum(axis=1))
    out = []
    for end, (source, target) in zip(ends.tolist(), lengths.tolist(), strict=True):
      start = end - source - target
      out.append((ids[start : start + source], ids[start + source : end]))
    return out

  def text(self) -> list[tuple[str, str]]:
    """The (source, target) text of every pair, if the cache kept it (`keep_text`)."""
    path = self.directory / TEXT_FILENAME
    if not path.is_file():
      return []
    return [tuple(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]

  def side(self, which: int) -> list[np.ndarray]:
    """Every pair's ids of one side (0 source, 1 target), in order, read in chunks."""
    out: list[np.ndarray] = []
    for start in range(0, len(self), 65_536):
      out += [pair[which] for pair in self.read(range(start, min(start + 65_536, len(self))))]
    return out


def open_cache(directory: Path) -> TokenCache | None:
  """The complete cache in `directory`, or None if there is none (yet)."""
  meta_path = directory / META_FILENAME
  if not meta_path.is_file():
    return None
  meta = json.loads(meta_path.read_text())
  lengths = np.load(directory / LENGTHS_FILENAME)
  if meta.get("format") != FORMAT_VERSION or len(lengths) != meta["pairs"]:
    raise UserError(
      f"token cache {directory} is damaged or of another format: delete it and it is built again"
    )
  return TokenCache(directory, lengths, meta)


def build_cache(
  directory: Path,
  chunks: Iterable[list[tuple[str, str]]],
  encode: Callable[[list[str]], list[list[int]]],
  *,
  vocab_size: int,
  built_from: dict[str, Any],
  keep_text: bool = False,
) -> TokenCache:
  """Encodes every chunk of (source, target) text pairs into a cache at `directory`.

  Each chunk becomes one ArrayRecord shard; only one chunk's text and ids are in memory at a
  time. `encode` is the tokenizer's (texts -> ids without EOS), `vocab_size` its size.
  `built_from` is recorded in meta.json (what text, which tokenizer). `keep_text` also keeps
  the text itself (text.jsonl), for evaluation splits whose references are needed.
  """
  start = time.perf_counter()
  directory.parent.mkdir(parents=True, exist_ok=True)
  for stale in directory.parent.glob(f"{directory.name}.tmp-*"):
    shutil.rmtree(stale, ignore_errors=True)  # a build that was cut short
  tmp = directory.parent / f"{directory.name}.tmp-{os.getpid()}"
  tmp.mkdir()
  dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
  lengths, shards, pieces, unknown = [], [], 0, 0
  try:
    # One file for the whole split, written chunk by chunk: a batch of pairs drawn from all over
    # the split is then one read (with a file per chunk it was one per file, 69 at WMT size).
    shards.append("ids-00000.array_record")
    writer = ArrayRecordWriter(str(tmp / shards[0]), WRITER_OPTIONS)
    for chunk in chunks:
      sources = encode([src for src, _ in chunk])
      targets = encode([tgt for _, tgt in chunk])
      for src, tgt in zip(sources, targets, strict=True):
        writer.write(np.asarray(src + tgt, dtype).tobytes())
      if keep_text:
        with open(tmp / TEXT_FILENAME, "a", encoding="utf-8") as f:
          f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in chunk)
      chunk_lengths = np.array(
        [[len(s), len(t)] for s, t in zip(sources, targets, strict=True)], np.int32
      ).reshape(-1, 2)
      lengths.append(chunk_lengths)
      pieces += int(chunk_lengths.sum())
      unknown += sum(ids.count(UNK_ID) for ids in sources) + sum(
        ids.count(UNK_ID) for ids in targets
      )
    writer.close()
    all_lengths = np.concatenate(lengths) if lengths else np.zeros((0, 2), np.int32)
    np.save(tmp / LENGTHS_FILENAME, all_lengths)
    meta = {
      "format": FORMAT_VERSION,
      "pairs": len(all_lengths),
      "dtype": np.dtype(dtype).name,
      "shards": shards,
      "pieces": pieces,
      "unknown_pieces": unknown,
      "built_from": built_from,
      "seconds": round(time.perf_counter() - start, 1),
    }
    # meta.json last: `open_cache` takes a directory without it for an unfinished one.
    (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2))
    if directory.exists():  # another process finished the same cache first: keep theirs
      shutil.rmtree(tmp)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  cache = open_cache(directory)
  assert cache is not None
  log.info(
    "token cache %s: %d pairs, %d pieces, built in %.0f s",
    directory,
    len(cache),
    cache.meta["pieces"],
    time.perf_counter() - start,
  )
  return cache
