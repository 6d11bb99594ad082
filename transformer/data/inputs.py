"""Everything a run reads: the tokenizer, the training stream, the evaluation and test sets.

Two phases. `prepare` makes what a run reads exist on disk and is the only one that reads text:
the tokenizer (trained once per corpus and kept in the workdir and the cache) and a token cache
per split (`transformer.data.token_cache`). One process runs it; it does nothing when all is
there. `build_inputs` then opens those files, in every process: a second start tokenizes
nothing and holds only the pairs' lengths in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transformer.data import batching
from transformer.data.config import DataConfig
from transformer.data.corpus import Corpus, Pair, default_cache_dir
from transformer.data.pipeline import (
  Batch,
  Examples,
  eval_batches,
  lm_windows,
  make_examples,
  mask_tokens,
)
from transformer.data.stream import TrainStream, language_model_stream, translation_stream
from transformer.data.token_cache import TokenCache, build_cache, cache_key, open_cache
from transformer.data.tokenizer import (
  MODEL_FILENAME,
  Tokenizer,
  check_vocab_size,
  load_or_train_tokenizer,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TestSet:
  """One evaluation split: its text pairs (references in file order) and its batches."""

  name: str
  pairs: list[Pair]
  examples: Examples
  batches: list[Batch]


@dataclasses.dataclass
class Inputs:
  """A run's tokenizer, training stream, validation batches and test sets.

  `train_pairs` counts the pairs of the training split and those the stream reads;
  `validation` is the validation split as a test set (for its BLEU).
  """

  tokenizer: Tokenizer
  train: TrainStream
  eval_batches: list[Batch]
  test_sets: list[TestSet]
  train_pairs: dict[str, int] = dataclasses.field(default_factory=dict)
  validation: TestSet | None = None


def splits_of(data: DataConfig, task: str) -> list[str]:
  """The splits a run reads: training, validation and, for translation, the test sets."""
  tests = list(data.test_splits) if task == "translation" else []
  return list(dict.fromkeys([data.train_split, data.eval_split, *tests]))


# ------------------------------------------------------------------------------------------------
# Preparing (one process)
# ------------------------------------------------------------------------------------------------


def prepare(data: DataConfig, workdir: Path, *, cache_dir: Path, task: str) -> None:
  """The run's tokenizer in `workdir` and a token cache for each split it reads, built if absent.

  Text is read in chunks and only when something is missing, so memory stays flat in the size
  of the corpus and a second start reads no text at all.
  """
  corpus = Corpus.of(data, cache_dir)
  tokenizer_path = ensure_tokenizer(data, corpus, workdir, cache_dir)
  for split in splits_of(data, task):
    ensure_split(corpus, split, tokenizer_path, cache_dir, keep_text=split != data.train_split)


def ensure_split(
  corpus: Corpus, split: str, tokenizer_path: Path, cache_dir: Path, *, keep_text: bool
) -> Path:
  """The token cache of `split` encoded by `tokenizer_path`, built if absent; its directory."""
  directory = cache_dir / "tokens" / cache_key(corpus.fingerprint(split), tokenizer_path)
  if open_cache(directory) is None:
    log.info("%s: encoding the text into %s", split, directory)
    tokenizer = Tokenizer(tokenizer_path)
    build_cache(
      directory,
      corpus.chunks(split),
      tokenizer.encode,
      vocab_size=tokenizer.vocab_size,
      built_from={
        "dataset": corpus.dataset,
        "split": split,
        "text": corpus.fingerprint(split),
        "tokenizer": _sha256(tokenizer_path),
      },
      keep_text=keep_text,
    )
  return directory


def ensure_tokenizer(data: DataConfig, corpus: Corpus, workdir: Path, cache_dir: Path) -> Path:
  """workdir/spm.model: the run's own, else a copy of the one trained earlier on the same text
  with the same settings, else one trained now (and kept in the cache for the next run)."""
  check_vocab_size(data.vocab_size)
  path = workdir / MODEL_FILENAME
  if path.exists():
    return path
  settings = {
    "text": corpus.fingerprint(data.train_split),
    "vocab_size": data.vocab_size,
    "type": data.tokenizer_type,
    "sentences": data.tokenizer_sentences,
  }
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
  cached = cache_dir / "tokenizers" / key
  if not (cached / MODEL_FILENAME).exists():
    sentences = _tokenizer_sentences(corpus, data.train_split, data.tokenizer_sentences // 2)
    train_tokenizer(data, cached, sentences)
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / f".{MODEL_FILENAME}.{os.getpid()}.tmp"
  try:
    shutil.copyfile(cached / MODEL_FILENAME, tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)  # a copy cut short (a full disk) leaves nothing behind
  return path


def _tokenizer_sentences(corpus: Corpus, split: str, num_pairs: int) -> Iterator[str]:
  """Both sides of the first `num_pairs` training pairs with text on both sides, interleaved."""
  taken = 0
  for chunk in corpus.chunks(split):
    for src, tgt in chunk:
      if taken == num_pairs:
        return
      if src.strip() and tgt.strip():
        taken += 1
        yield src
        yield tgt


def train_tokenizer(data: DataConfig, directory: Path, sentences: Iterable[str]) -> None:
  """directory/spm.model trained on `sentences` with the data block's vocabulary, or a one-line
  error naming the vocabulary size the text allows."""
  check_vocab_size(data.vocab_size)
  try:
    load_or_train_tokenizer(directory, sentences, data.vocab_size, model_type=data.tokenizer_type)
  except RuntimeError as error:
    # SentencePiece states the size the text allows only inside its message.
    if too_small := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error)):
      raise ValueError(
        f"data.vocab_size={data.vocab_size} is fewer pieces than the training "
        "text's characters and the special pieces need (at least "
        f"{too_small[1]}): raise data.vocab_size"
      ) from None
    if too_large := re.search(r"Vocabulary size too high.*<= (\d+)", str(error)):
      raise ValueError(
        f"data.vocab_size={data.vocab_size} is more pieces than the training text "
        f"supports (at most {too_large[1]}): lower data.vocab_size"
      ) from None
    raise


def _sha256(path: Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Opening (every process)
# ------------------------------------------------------------------------------------------------


def open_split(data: DataConfig, workdir: Path, cache_dir: Path, split: str) -> TokenCache:
  corpus = Corpus.of(data, cache_dir)
  directory = cache_dir / "tokens" / cache_key(corpus.fingerprint(split), workdir / MODEL_FILENAME)
  cache = open_cache(directory)
  if cache is None:
    raise FileNotFoundError(f"{split}: no token cache in {directory}: prepare the data first")
  unknown = cache.meta["unknown_pieces"]
  if unknown:
    log.warning(
      "%s: %d of %d pieces (%.3f%%) are outside the vocabulary and map to <unk>",
      split,
      unknown,
      cache.meta["pieces"],
      100 * unknown / max(cache.meta["pieces"], 1),
    )
  return cache


def build_inputs(
  data: DataConfig,
  workdir: str | os.PathLike,
  *,
  task: str = "translation",
  seed: int = 0,
  batch_tokens: int | None = None,
  batch_multiple: int = 1,
  process_index: int = 0,
  process_count: int = 1,
  cache_dir: Path | None = None,
  packing: bool | None = None,
  prefetch: int = 2,
  prepare_data: bool = True,
) -> Inputs:
  """The run's inputs, prepared first unless `prepare_data` is False (another process did it).

  Args:
    data: the data block.
    workdir: where the tokenizer is kept.
    task: "translation", "lm" or "mlm": the format of the batches.
    seed: the order of the training data (and the masked-LM corruption).
    batch_tokens: tokens of one training batch; default data.tokens_per_batch. With gradient
      accumulation a batch holds k micro-batches: k times that.
    batch_multiple: rows of a training batch are a multiple of this (data-parallel ways x k).
    process_index, process_count: this process's share of every batch's rows.
    cache_dir: where token caches (and tfds data) are shared; default `default_cache_dir`.
    packing: several pairs per row; default data.packing.
    prefetch: batches assembled ahead in a background thread (0: none).
  """
  workdir = Path(workdir)
  if cache_dir is None:
    cache_dir = (
      Path(data.cache_dir) if data.cache_dir else default_cache_dir(workdir, process_count)
    )
  if prepare_data:
    prepare(data, workdir, cache_dir=cache_dir, task=task)
  tokenizer = Tokenizer(workdir / MODEL_FILENAME)
  if tokenizer.vocab_size != data.vocab_size:
    raise ValueError(
      f"{tokenizer.model_path} has vocab_size {tokenizer.vocab_size}, not "
      f"data.vocab_size={data.vocab_size}: use another workdir or the stored "
      "model's size"
    )
  shard = dict(process_index=process_index, process_count=process_count)
  batch_tokens = batch_tokens or data.tokens_per_batch
  train = open_split(data, workdir, cache_dir, data.train_split)
  # Language models read running text: long sentences are cut into windows, not dropped.
  truncate = data.truncate or task != "translation"
  usable, counts = batching.usable_pairs(train.lengths, data.max_len, truncate)
  _report_usable(data.train_split, data.max_len, truncate, counts)
  if task == "translation":
    layout = batching.Layout.of(
      max_len=data.max_len,
      tokens_per_batch=batch_tokens,
      multiple=batch_multiple,
      buckets=data.length_buckets,
      packing=data.packing if packing is None else packing,
    )
    stream = translation_stream(train, usable, layout, seed=seed, prefetch=prefetch, **shard)
  else:
    # Language models read the target side as running text, in windows of max_len tokens.
    targets = [
      target
      for start in range(0, len(usable), batching.CHUNK)
      for _, target in train.read(usable[start : start + batching.CHUNK])
    ]
    windows = lm_windows(targets, data.max_len)
    rows = batching.rows_per_batch(data.max_len, batch_tokens, batch_multiple)
    mlm = (tokenizer.vocab_size, data.mlm_select_rate) if task == "mlm" else None
    stream = language_model_stream(windows, rows, seed=seed, mlm=mlm, prefetch=prefetch, **shard)

  validation = _evaluation_set(data, workdir, cache_dir, data.eval_split, shard)
  test_sets = [
    _evaluation_set(data, workdir, cache_dir, split, shard)
    for split in (data.test_splits if task == "translation" else ())
  ]
  eval_batches_ = _eval_batches_for_task(
    task, seed, data.mlm_select_rate, validation.batches, tokenizer, **shard
  )
  return Inputs(
    tokenizer,
    stream,
    eval_batches_,
    test_sets,
    train_pairs=counts,
    validation=validation,
  )


def _report_usable(split: str, max_len: int, truncate: bool, counts: dict[str, int]) -> None:
  if counts["empty"]:
    log.warning(
      "%s: %d of %d pairs have an empty side and were dropped",
      split,
      counts["empty"],
      counts["pairs"],
    )
  if counts["too_long"]:
    action = "truncated" if truncate else "dropped"
    log.warning(
      "%s: pairs over data.max_len=%d tokens: %d %s, %d kept",
      split,
      max_len,
      counts["too_long"],
      action,
      counts["kept"],
    )
  if not counts["kept"]:
    raise ValueError(
      f"{split} has no pair with text on both sides within data.max_len="
      f"{max_len}: check the data files, or raise data.max_len"
    )


def evaluation_set(
  data: DataConfig,
  workdir: Path,
  split: str,
  *,
  cache_dir: Path | None = None,
  batch_size: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> TestSet:
  """One split as training evaluates it (its token cache built first if missing): batches of
  data.eval_batch_size sentences (or `batch_size`) in the split's order."""
  workdir = Path(workdir)
  cache_dir = cache_dir or (
    Path(data.cache_dir) if data.cache_dir else default_cache_dir(workdir, process_count)
  )
  ensure_split(
    Corpus.of(data, cache_dir), split, workdir / MODEL_FILENAME, cache_dir, keep_text=True
  )
  shard = dict(process_index=process_index, process_count=process_count)
  return _evaluation_set(data, workdir, cache_dir, split, shard, batch_size)


def file_evaluation_set(
  name: str,
  pairs: list[Pair],
  tokenizer: Tokenizer,
  data: DataConfig,
  *,
  batch_size: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> TestSet:
  """An evaluation set of (source, reference) text pairs from files, batched like a split."""
  ids = tokenizer.encode([s for s, _ in pairs]), tokenizer.encode([t for _, t in pairs])
  examples, _ = make_examples(ids[0], ids[1], data.max_len, truncate=True)
  return TestSet(
    name,
    pairs,
    examples,
    _batches(
      data, examples, batch_size, dict(process_index=process_index, process_count=process_count)
    ),
  )


def _batches(
  data: DataConfig, examples: Examples, batch_size: int | None, shard: dict[str, int]
) -> list[Batch]:
  buckets = tuple(data.length_buckets) or batching.default_length_buckets(data.max_len)
  return eval_batches(examples, batch_size or data.eval_batch_size, length_buckets=buckets, **shard)


def _evaluation_set(
  data: DataConfig,
  workdir: Path,
  cache_dir: Path,
  split: str,
  shard: dict[str, int],
  batch_size: int | None = None,
) -> TestSet:
  """A split's pairs in order, cut to data.max_len (every line needs a translation)."""
  cache = open_split(data, workdir, cache_dir, split)
  if not len(cache) or not (cache.lengths.min(axis=1) > 0).any():
    raise ValueError(
      f"{split} has no pair with text on both sides: an evaluation set of empty "
      "lines scores nothing; check the data files"
    )
  ids = cache.read(range(len(cache)))
  examples, stats = make_examples(
    [s for s, _ in ids], [t for _, t in ids], data.max_len, truncate=True
  )
  if stats.truncated:
    log.warning(
      "%s: pairs over data.max_len=%d tokens: %d truncated, %d kept",
      split,
      data.max_len,
      stats.truncated,
      stats.kept,
    )
  if not len(examples):
    raise ValueError(f"{split} is empty: check the data files")
  return TestSet(split, cache.text(), examples, _batches(data, examples, batch_size, shard))


def _eval_batches_for_task(
  task: str,
  seed: int,
  mlm_select_rate: float,
  batches: list[Batch],
  tokenizer: Tokenizer,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> list[Batch]:
  """Validation batches in the task's format, with per-token weights.

  `batches` hold this process's rows; masked-LM corruption is drawn for the global batches.
  """
  out: list[dict[str, Any]] = []
  for i, batch in enumerate(batches):
    weights_BT = (batch["targets"] != 0).astype(np.float32) * batch["weights"][:, None]
    if task == "translation":
      out.append({"inputs": batch["inputs"], "targets": batch["targets"], "weights": weights_BT})
    elif task == "lm":
      out.append({"targets": batch["targets"], "weights": weights_BT})
    else:
      # A fixed corruption per validation batch (stream 2**31, apart from training epochs).
      masked = mask_tokens(
        batch["targets"],
        np.random.default_rng([seed, 2**31, i]),
        tokenizer.vocab_size,
        select_rate=mlm_select_rate,
        process_index=process_index,
        process_count=process_count,
      )
      masked["weights"] = masked["weights"] * batch["weights"][:, None]
      out.append(masked)
  return out
