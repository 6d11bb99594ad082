"""Where a run's text comes from: a split of Multi30k, of any tfds dataset, or of your own files
(`transformer.data.files`), read in chunks.

Reading in chunks keeps memory flat: a WMT-sized split of millions of pairs is tokenized chunk by
chunk into the token cache (`transformer.data.token_cache`), never held whole in Python lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformer.data.config import DataConfig
from transformer.data.files import FileCorpus
from transformer.errors import UserError
from transformer.files import cache_root

Pair = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a run's data lives, resolved once: the workdir (which keeps the run's tokenizer) and
  the cache shared by every run that reads the same text (token caches, tokenizers, tfds data)."""

  workdir: Path
  cache_dir: Path

  @classmethod
  def of(cls, data: DataConfig, workdir: str | os.PathLike, process_count: int = 1) -> Location:
    """data.cache_dir, else $TRANSFORMER_CACHE_DIR, else <workdir>/cache when several processes
    run (the workdir is the one folder every host is known to see), else ~/.cache/transformer."""
    workdir = Path(workdir)
    if data.cache_dir:
      cache_dir = Path(data.cache_dir)
    elif os.environ.get("TRANSFORMER_CACHE_DIR"):
      cache_dir = cache_root()
    elif process_count > 1:
      cache_dir = workdir / "cache"
    else:
      cache_dir = default_cache_dir()
    return cls(workdir, cache_dir)


def default_cache_dir() -> Path:
  """Where a single process shares prepared data (and compiled programs) with later runs
  (`transformer.files.cache_root`)."""
  return cache_root()


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The splits of one dataset, as the data block names them, prepared under `tfds_dir`."""

  dataset: str
  source_lang: str
  target_lang: str
  tfds_dir: Path
  source_dir: Path | None  # Multi30k's text files; None for tfds datasets

  @classmethod
  def of(cls, data: DataConfig, cache_dir: Path) -> Corpus | FileCorpus:
    """The corpus of `data`: its files (dataset text or parallel), or a tfds dataset prepared
    under data.tfds_data_dir, else $TFDS_DATA_DIR, else `cache_dir`/tfds (shared by every run
    that reads the same dataset)."""
    if data.from_files:
      return FileCorpus.of(data)
    if data.tfds_data_dir:
      tfds_dir = Path(data.tfds_data_dir)
    elif os.environ.get("TFDS_DATA_DIR"):
      tfds_dir = Path(os.environ["TFDS_DATA_DIR"])
    else:
      tfds_dir = cache_dir / "tfds"
    source_dir = None
    if data.dataset == "multi30k":
      from transformer.data.multi30k import DEFAULT_SOURCE_DIR

      source_dir = Path(data.source_dir) if data.source_dir else DEFAULT_SOURCE_DIR
    return cls(data.dataset, data.source_lang, data.target_lang, tfds_dir, source_dir)

  def fingerprint(self, split: str) -> str:
    """A short hash naming this split's text: Multi30k's file contents, or a tfds dataset's
    name (with its version) and split. Two runs with equal fingerprints read the same pairs."""
    identity: dict[str, Any] = {
      "dataset": self.dataset,
      "split": split,
      "languages": [self.source_lang, self.target_lang],
    }
    if self.source_dir is not None:
      from transformer.data.multi30k import source_fingerprint

      identity["files"] = source_fingerprint(self.source_dir)
    else:
      identity["tfds_dir"] = str(self.tfds_dir.absolute())
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

  def source(self, split: str) -> Sequence[Mapping[str, Any]]:
    """The split's examples with random access (tfds prepares them on first use)."""
    # Imported here: tensorflow-datasets takes seconds to import, which runs reading their own
    # files or a prepared token cache do not need.
    import tensorflow_datasets as tfds

    from transformer.data.multi30k import prepare_multi30k

    try:
      if self.source_dir is not None:
        found = prepare_multi30k(self.tfds_dir, self.source_dir).as_data_source(split=split)
      else:
        # tfds.data_source defaults to ArrayRecord only without data_dir and builder_kwargs;
        # otherwise it would prepare TFRecord files, unreadable without TensorFlow.
        found = tfds.data_source(
          self.dataset,
          split=split,
          data_dir=os.fspath(self.tfds_dir),
          builder_kwargs={"file_format": "array_record"},
        )
      len(found)  # a slice that ends before it starts ([5:3]) has a negative length
      return found
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(
        f"data.dataset={self.dataset!r} is not a tensorflow-datasets name: use "
        "multi30k or a tfds dataset such as wmt14_translate/de-en"
      ) from None
    except UserError:
      raise
    except ValueError as error:
      # tfds's words for a split it cannot read: an unknown name, a slice it cannot parse, or a
      # slice that selects nothing ("Paths sequence can not be of 0 length", or a negative
      # length: "__len__() should return >= 0").
      reason = " ".join(str(error).split())
      if "0 length" in reason or "should return >= 0" in reason:
        reason = "the slice selects no pairs"
      raise UserError(
        f"{self.dataset} split {split!r} cannot be read ({reason[:300]}): name a split of the "
        "dataset, with a slice that selects pairs such as train[:2000]"
      ) from None

  def chunks(self, split: str, size: int = 65_536) -> Iterator[list[Pair]]:
    """The split's (source, target) pairs in dataset order, `size` at a time."""
    source = self.source(split)
    for start in range(0, len(source), size):
      try:
        records = _read(source, range(start, min(start + size, len(source))))
      except (RuntimeError, OSError) as error:  # ArrayRecord's words for a cut or damaged file
        reason = " ".join(str(error).split())[:200]
        raise UserError(
          f"{self.dataset} split {split!r}: the prepared files under {self.tfds_dir} cannot be "
          f"read ({reason}): delete that dataset's folder there and it is prepared again"
        ) from None
      yield [self._pair(record, split) for record in records]

  def pairs(self, split: str) -> list[Pair]:
    """Every pair of a (small) split, in dataset order."""
    return [pair for chunk in self.chunks(split) for pair in chunk]

  def _pair(self, record: Mapping[str, Any], split: str) -> Pair:
    try:
      return _text(record[self.source_lang]), _text(record[self.target_lang])
    except KeyError as error:
      raise UserError(
        f"{self.dataset} has no language {error} in split {split!r}: set "
        "data.source_lang and data.target_lang to its feature names"
      ) from None


def _read(source, keys: range) -> Sequence[Mapping[str, Any]]:
  # One batched read instead of len(keys) single-record reads.
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(keys))
  return [source[i] for i in keys]


def _text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value
