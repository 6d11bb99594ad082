"""Everything a run reads: the tokenizer, the training stream, the evaluation and test sets.

Two ways in: `training_inputs` for a training run, `evaluation_sets` for scoring a trained one.

Training works in two phases. `prepare` makes what a run reads exist on disk and is the only one
that reads text: the tokenizer (trained once per corpus and kept in the workdir and the cache)
and a token cache per split (`transformer.data.token_cache`). One process runs it (the caller
says which: `first_process`); it does nothing when all is there. Every process then opens those
files: a second start tokenizes nothing and holds only the pairs' lengths in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transformer.data import batching
from transformer.data.batching import Share
from transformer.data.config import DataConfig
from transformer.data.corpus import Corpus, Location, Pair
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
from transformer.errors import MissingFile, UserError

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


def prepare(data: DataConfig, task: str, where: Location) -> None:
  """The run's tokenizer in the workdir and a token cache for each split it reads, built if
  absent.

  Text is read in chunks and only when something is missing, so memory stays flat in the size
  of the corpus and a second start reads no text at all.
  """
  corpus = Corpus.of(data, where.cache_dir)
  tokenizer_path = ensure_tokenizer(data, corpus, where.workdir, where.cache_dir)
  for split in splits_of(data, task):
    ensure_split(
      corpus, split, tokenizer_path, where.cache_dir, keep_text=split != data.train_split
    )


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
  # Loaded before it is copied: a damaged cached copy is named as itself, not as the workdir's.
  Tokenizer(cached / MODEL_FILENAME)
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
      raise UserError(
        f"data.vocab_size={data.vocab_size} is fewer pieces than the training "
        "text's characters and the special pieces need (at least "
        f"{too_small[1]}): raise data.vocab_size"
      ) from None
    if too_large := re.search(r"Vocabulary size too high.*<= (\d+)", str(error)):
      raise UserError(
        f"data.vocab_size={data.vocab_size} is more pieces than the training text "
        f"supports (at most {too_large[1]}): lower data.vocab_size"
      ) from None
    raise


def _sha256(path: Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Opening (every process)
# ------------------------------------------------------------------------------------------------


def open_split(
  data: DataConfig, where: Location, split: str, tokenizer_path: Path | None = None
) -> TokenCache:
  """The token cache of `split` encoded by `tokenizer_path` (default: the workdir's tokenizer;
  a model scored with another, e.g. an export copied in, names its own)."""
  corpus = Corpus.of(data, where.cache_dir)
  tokenizer_path = tokenizer_path or where.workdir / MODEL_FILENAME
  directory = where.cache_dir / "tokens" / cache_key(corpus.fingerprint(split), tokenizer_path)
  cache = open_cache(directory)
  if cache is None:
    raise MissingFile(f"{split}: no token cache in {directory}: prepare the data first")
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


def _now(job: Callable[[], None]) -> None:
  job()


def training_inputs(
  data: DataConfig,
  where: Location,
  *,
  task: str,
  seed: int,
  batch_tokens: int | None = None,
  batch_multiple: int = 1,
  share: Share = Share(),
  first_process: Callable[[Callable[[], None]], None] = _now,
  packing: bool | None = None,
  prefetch: int = 2,
) -> Inputs:
  """A training run's inputs: prepared (by the process `first_process` runs the job on, while
  the others wait), then opened in this process.

  Args:
    data: the data block.
    where: the workdir (the tokenizer) and the shared cache.
    task: "translation", "lm" or "mlm": the format of the batches.
    seed: the order of the training data (and the masked-LM corruption).
    batch_tokens: tokens of one training batch; default data.tokens_per_batch. With gradient
      accumulation a batch holds k micro-batches: k times that.
    batch_multiple: rows of a training batch are a multiple of this (data-parallel ways x k).
    share: this process's rows of every batch.
    first_process: runs the preparation once (`transformer.parallel.distributed
      .on_first_process` in a multi-host job); by default here and now.
    packing: several pairs per row; default data.packing.
    prefetch: batches assembled ahead in a background thread (0: none).
  """
  first_process(lambda: prepare(data, task, where))
  tokenizer = Tokenizer(where.workdir / MODEL_FILENAME)
  if tokenizer.vocab_size != data.vocab_size:
    raise UserError(
      f"{tokenizer.model_path} has vocab_size {tokenizer.vocab_size}, not "
      f"data.vocab_size={data.vocab_size}: use another workdir or the stored "
      "model's size"
    )
  batch_tokens = batch_tokens or data.tokens_per_batch
  train = open_split(data, where, data.train_split)
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
    stream = translation_stream(train, usable, layout, seed=seed, prefetch=prefetch, share=share)
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
    stream = language_model_stream(
      windows, rows, seed=seed, mlm=mlm, prefetch=prefetch, share=share
    )
  validation = _evaluation_set(data, where, data.eval_split, share)
  test_sets = [
    _evaluation_set(data, where, split, share)
    for split in (data.test_splits if task == "translation" else ())
  ]
  eval_batches_ = _eval_batches_for_task(
    task, seed, data.mlm_select_rate, validation.batches, tokenizer, share
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
    raise UserError(
      f"{split} has no pair with text on both sides within data.max_len="
      f"{max_len}: check the data files, or raise data.max_len"
    )


# A split of the run's dataset by name, or (name, (source, reference) pairs) read from files.
EvaluationSource = str | tuple[str, list[Pair]]


def evaluation_sets(
  data: DataConfig,
  where: Location,
  sources: Sequence[EvaluationSource],
  *,
  tokenizer: Tokenizer,
  batch_size: int | None = None,
  share: Share = Share(),
) -> list[TestSet]:
  """Sets to score a trained run on, batched as training evaluates (data.eval_batch_size, or
  `batch_size`, sentences a batch, in length buckets): each split by name (its token cache
  built first if missing), or (name, pairs) of text read from files."""
  sets = []
  for source in sources:
    if isinstance(source, str):
      ensure_split(
        Corpus.of(data, where.cache_dir),
        source,
        tokenizer.model_path,
        where.cache_dir,
        keep_text=True,
      )
      sets.append(_evaluation_set(data, where, source, share, batch_size, tokenizer.model_path))
      continue
    name, pairs = source
    ids = tokenizer.encode([s for s, _ in pairs]), tokenizer.encode([t for _, t in pairs])
    examples, _ = make_examples(ids[0], ids[1], data.max_len, truncate=True)
    sets.append(TestSet(name, pairs, examples, _batches(data, examples, batch_size, share)))
  return sets


def _batches(
  data: DataConfig, examples: Examples, batch_size: int | None, share: Share
) -> list[Batch]:
  buckets = tuple(data.length_buckets) or batching.default_length_buckets(data.max_len)
  return eval_batches(
    examples,
    batch_size or data.eval_batch_size,
    length_buckets=buckets,
    process_index=share.index,
    process_count=share.count,
  )


def _evaluation_set(
  data: DataConfig,
  where: Location,
  split: str,
  share: Share,
  batch_size: int | None = None,
  tokenizer_path: Path | None = None,
) -> TestSet:
  """A split's pairs in order, cut to data.max_len (every line needs a translation)."""
  cache = open_split(data, where, split, tokenizer_path)
  if not len(cache) or not (cache.lengths.min(axis=1) > 0).any():
    raise UserError(
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
    raise UserError(f"{split} is empty: check the data files")
  return TestSet(split, cache.text(), examples, _batches(data, examples, batch_size, share))


def _eval_batches_for_task(
  task: str,
  seed: int,
  mlm_select_rate: float,
  batches: list[Batch],
  tokenizer: Tokenizer,
  share: Share,
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
        process_index=share.index,
        process_count=share.count,
      )
      masked["weights"] = masked["weights"] * batch["weights"][:, None]
      out.append(masked)
  return out
