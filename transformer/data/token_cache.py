"""Token ids of a split, encoded once into ArrayRecord files and shared by every run that reads the
same text with the same tokenizer.

A cache is a directory named by a hash of (the split's text, the tokenizer file, the format):

  lengths.npy              [n, 2] int32: source and target pieces of each pair, EOS not included
  ids-00000.array_record   one record per pair: its source ids then its target ids (uint16 when
                           the vocabulary fits, else uint32), uncompressed, 64 records a group:
                           a read of a batch's records costs a few groups' decoding, and the
                           reader's index of groups stays small (one record a group made each
                           read of a 4.5M-pair file cost ~60 ms of index lookups)
  text.jsonl               (evaluation splits) each pair's text, one JSON [source, target] a line
  meta.json                pair count, dtype, pieces outside the vocabulary, what it was built from,
                           and what the other files must be: SHA-256 of lengths.npy and
                           text.jsonl, the byte size of each ArrayRecord file

Nothing in a cache is trusted: `open_cache` checks meta.json's fields, lengths.npy and text.jsonl
against their hashes and the shards' sizes, and every record read must be as long as its row of
lengths says. A damaged cache is a one-line error that names it; deleting the folder rebuilds it.

It is built chunk by chunk (memory bounded by one chunk, whatever the split's size) into a temporary
directory that is renamed into place when complete, so a reader sees a whole cache or none, and
a build cut short leaves nothing behind but its temporary directory (removed by the next build).
Pairs stay in dataset order; empty or over-long pairs are left in and filtered by their lengths
when batches are planned, so evaluation pairs keep their line numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
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
# Version 3: meta.json records the hashes of lengths.npy and text.jsonl and the shards' sizes
# (caches of version 2 are not read: the next run builds the version 3 one beside them).
FORMAT_VERSION = 3
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
      try:
        readers = [
          ArrayRecordReader(str(self.directory / name), READER_OPTIONS)
          for name in self.meta["shards"]
        ]
        sizes = [reader.num_records() for reader in readers]
      except (RuntimeError, OSError, ValueError) as error:
        raise damaged(self.directory, f"its records cannot be read: {_words(error)}") from None
      if sum(sizes) != len(self.lengths):
        raise damaged(self.directory, f"it holds {sum(sizes)} records for {len(self)} pairs")
      self._readers = readers
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
    try:
      if (shard_of == shard_of[0]).all():  # the common case: one shard, one read
        records = readers[shard_of[0]].read((indices - starts[shard_of[0]]).tolist())
      else:
        records = [b""] * len(indices)
        for shard in np.unique(shard_of).tolist():
          where = np.flatnonzero(shard_of == shard)
          positions = (indices[where] - starts[shard]).tolist()
          for k, record in zip(where.tolist(), readers[shard].read(positions), strict=True):
            records[k] = record
    except (RuntimeError, OSError, ValueError) as error:  # ArrayRecord's words for a bad file
      raise damaged(self.directory, f"its records cannot be read: {_words(error)}") from None
    # Each record holds its pair's ids: as many as its row of lengths says, or the pairs would
    # be cut apart at the wrong places.
    wanted = self.lengths[indices].sum(axis=1) * self.dtype.itemsize
    got = np.fromiter(map(len, records), np.int64, len(records))
    if (got != wanted).any():
      k = int(np.flatnonzero(got != wanted)[0])
      raise damaged(
        self.directory,
        f"record {int(indices[k])} holds {got[k]} bytes, its lengths say {wanted[k]}",
      )
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
    if "text_sha256" not in self.meta:
      return []
    data = _checked_bytes(self.directory, TEXT_FILENAME, self.meta["text_sha256"])
    pairs = []
    try:
      # Lines end at "\n" only: json.dumps escapes every other line break inside a pair.
      for line in data.decode("utf-8").split("\n")[:-1]:
        pair = json.loads(line)
        if not (
          isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        ):
          raise ValueError(f"a line holds {type(pair).__name__}, not [source, target]")
        pairs.append((pair[0], pair[1]))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError included
      raise damaged(self.directory, f"{path.name} cannot be read: {_words(error)}") from None
    if len(pairs) != len(self):
      raise damaged(self.directory, f"{path.name} holds {len(pairs)} pairs, not {len(self)}")
    return pairs

  def side(self, which: int) -> list[np.ndarray]:
    """Every pair's ids of one side (0 source, 1 target), in order, read in chunks."""
    out: list[np.ndarray] = []
    for start in range(0, len(self), 65_536):
      out += [pair[which] for pair in self.read(range(start, min(start + 65_536, len(self))))]
    return out


def damaged(directory: Path, what: str) -> UserError:
  """The one-line error for a cache that cannot be used as it is: what is wrong, and the fix."""
  return UserError(
    f"token cache {directory} is damaged ({what}): delete that folder and it is built again"
  )


def _words(error: BaseException) -> str:
  return " ".join(str(error).split())[:200] or type(error).__name__


def _checked_bytes(directory: Path, name: str, sha256: str) -> bytes:
  """A cache file's contents, checked against the SHA-256 that meta.json recorded."""
  try:
    data = (directory / name).read_bytes()
  except OSError as error:
    raise damaged(directory, f"{name}: {error.strerror}") from None
  if hashlib.sha256(data).hexdigest() != sha256:
    raise damaged(directory, f"{name} differs from the SHA-256 in {META_FILENAME}")
  return data


# meta.json's fields a reader relies on, and their types.
META_FIELDS = {
  "format": int,
  "pairs": int,
  "dtype": str,
  "shards": list,
  "shard_bytes": list,
  "pieces": int,
  "unknown_pieces": int,
  "lengths_sha256": str,
}


def _read_meta(directory: Path) -> dict[str, Any]:
  try:
    meta = json.loads((directory / META_FILENAME).read_text(encoding="utf-8"))
  except OSError as error:
    raise damaged(directory, f"{META_FILENAME}: {error.strerror}") from None
  except ValueError as error:  # UnicodeDecodeError and JSONDecodeError included
    raise damaged(directory, f"{META_FILENAME} is not valid JSON: {_words(error)}") from None
  if not isinstance(meta, dict):
    raise damaged(directory, f"{META_FILENAME} holds a {type(meta).__name__}, not an object")
  if meta.get("format") != FORMAT_VERSION:
    raise UserError(
      f"token cache {directory} is of format {meta.get('format')!r}, not {FORMAT_VERSION}: "
      "delete that folder and it is built again"
    )
  for key, kind in META_FIELDS.items():
    if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), kind):
      raise damaged(directory, f"{META_FILENAME} has no {kind.__name__} {key!r}")
  shards = meta["shards"]
  if not shards or not all(
    isinstance(name, str) and name == Path(name).name and name.endswith(".array_record")
    for name in shards
  ):
    raise damaged(directory, f"{META_FILENAME} names shards {shards!r}")
  if meta["dtype"] not in ("uint16", "uint32") or meta["pairs"] < 0:
    raise damaged(directory, f"{META_FILENAME} has dtype {meta['dtype']!r}, pairs {meta['pairs']}")
  return meta


def open_cache(directory: Path) -> TokenCache | None:
  """The complete cache in `directory`, or None if there is none (yet). Every file is checked
  (module docstring); a damaged one is a one-line error naming the folder and the fix."""
  if not (directory / META_FILENAME).is_file():
    return None
  meta = _read_meta(directory)
  data = _checked_bytes(directory, LENGTHS_FILENAME, meta["lengths_sha256"])
  try:
    lengths = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, OSError, EOFError) as error:
    raise damaged(directory, f"{LENGTHS_FILENAME} cannot be read: {_words(error)}") from None
  if lengths.dtype != np.int32 or lengths.shape != (meta["pairs"], 2) or (lengths < 0).any():
    raise damaged(
      directory,
      f"{LENGTHS_FILENAME} is {lengths.dtype} {lengths.shape}, not int32 ({meta['pairs']}, 2) "
      "counts",
    )
  for name, size in zip(meta["shards"], meta["shard_bytes"], strict=False):
    path = directory / name
    if not path.is_file() or path.stat().st_size != size:
      found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
      raise damaged(directory, f"{name} is {found}, {META_FILENAME} says {size} bytes")
  if len(meta["shards"]) != len(meta["shard_bytes"]):
    raise damaged(
      directory, f"{META_FILENAME} has {len(meta['shards'])} shards but not their sizes"
    )
  return TokenCache(directory, lengths, meta)


def _file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _builder_alive(tmp: Path) -> bool:
  """Whether the process that names the temporary folder `tmp` (`NAME.tmp-PID`) still runs: two
  commands can build the same cache at once (each keeps its own folder; the first to finish
  renames it into place)."""
  pid = tmp.name.rpartition(".tmp-")[2]
  if not pid.isdigit() or int(pid) == os.getpid():
    return False
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:  # another user's process
    return True
  return True


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
    if not _builder_alive(stale):  # a build that was cut short; a live one is another command's
      shutil.rmtree(stale, ignore_errors=True)
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
    if keep_text and not (tmp / TEXT_FILENAME).exists():
      (tmp / TEXT_FILENAME).write_bytes(b"")  # a split of no pairs has no lines
    meta = {
      "format": FORMAT_VERSION,
      "pairs": len(all_lengths),
      "dtype": np.dtype(dtype).name,
      "shards": shards,
      "shard_bytes": [(tmp / name).stat().st_size for name in shards],
      "pieces": pieces,
      "unknown_pieces": unknown,
      "lengths_sha256": _file_sha256(tmp / LENGTHS_FILENAME),
      **({"text_sha256": _file_sha256(tmp / TEXT_FILENAME)} if keep_text else {}),
      "built_from": built_from,
      "seconds": round(time.perf_counter() - start, 1),
    }
    # meta.json last: `open_cache` takes a directory without it for an unfinished one.
    (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    try:
      os.replace(tmp, directory)
    except OSError:
      if not directory.is_dir():
        raise
      if open_cache(directory) is None:  # no meta.json there: damaged, not another's cache
        shutil.rmtree(directory)
        os.replace(tmp, directory)
      else:
        shutil.rmtree(tmp)  # another process finished the same cache first: keep theirs
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
