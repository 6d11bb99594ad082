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
from transformer.data.files import FileCorpus, test_names
from transformer.data.pipeline import (
  Batch,
  Examples,
  eval_batches,
  lm_windows,
  make_examples,
  mask_tokens,
  running_ids,
  running_windows,
)
from transformer.data.stream import (
  TrainStream,
  language_model_stream,
  running_text_stream,
  translation_stream,
)
from transformer.data.token_cache import TokenCache, build_cache, cache_key, open_cache
from transformer.data.tokenizer import (
  PAD_ID,
  Tokenizer,
  check_vocab_size,
  load_or_train_tokenizer,
  tokenizer_file,
  tokenizer_filename,
  write_byte_vocab,
  write_char_vocab,
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
  `validation` is the validation split as a test set (for its BLEU); `made_of` names the
  tokenizer and training text the batches are made of (`made_of`), which each checkpoint
  records beside the stream's position.
  """

  tokenizer: Tokenizer
  train: TrainStream
  eval_batches: list[Batch]
  test_sets: list[TestSet]
  train_pairs: dict[str, int] = dataclasses.field(default_factory=dict)
  validation: TestSet | None = None
  made_of: dict[str, str] = dataclasses.field(default_factory=dict)


def splits_of(data: DataConfig, task: str) -> list[str]:
  """The splits a run reads: training, validation and, for translation, the test sets (of
  data.test_files when the text comes from files)."""
  tests = test_splits(data) if task == "translation" else []
  return list(dict.fromkeys([data.train_split, data.eval_split, *tests]))


def test_splits(data: DataConfig) -> list[str]:
  """The names of a translation run's test sets."""
  return test_names(data) if data.from_files else list(data.test_splits)


def running_text(data: DataConfig, task: str) -> bool:
  """Whether the language models read the split as running text (windows across line breaks,
  dataset text) rather than as the target side's sentences (Multi30k, tfds)."""
  return task != "translation" and data.dataset == "text"


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
  corpus: Corpus | FileCorpus,
  split: str,
  tokenizer_path: Path,
  cache_dir: Path,
  *,
  keep_text: bool,
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


def ensure_tokenizer(
  data: DataConfig, corpus: Corpus | FileCorpus, workdir: Path, cache_dir: Path
) -> Path:
  """The run's tokenizer file in the workdir (spm.model, or vocab.json for char and byte): the
  run's own, else a copy of the one made earlier from the same text with the same settings,
  else one made now (and kept in the cache for the next run)."""
  kind = data.tokenizer_kind
  check_vocab_size(data.vocab_size, kind)
  path = tokenizer_file(workdir)
  if path.exists():
    if Tokenizer(path).kind != kind:
      raise UserError(
        f"{path} is a {Tokenizer(path).kind} tokenizer, but data.tokenizer_type="
        f"{data.tokenizer_type}: use another workdir, or delete {path.name} to make a new one"
      )
    return path
  path = workdir / tokenizer_filename(kind)
  settings = {
    "text": corpus.fingerprint(data.train_split),
    "vocab_size": data.vocab_size,
    "type": data.tokenizer_type,
    "sentences": data.tokenizer_sentences,
  }
  if kind == "byte":  # nothing learnt from the text
    settings = {"type": "byte"}
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
  cached = cache_dir / "tokenizers" / key / path.name
  if not cached.exists():
    if kind == "byte":
      write_byte_vocab(cached)
    elif kind == "char":
      write_char_vocab(cached, _characters(corpus, data.train_split))
    else:
      sentences = _tokenizer_sentences(corpus, data.train_split, data.tokenizer_sentences // 2)
      train_tokenizer(data, cached.parent, sentences)
  # Loaded before it is copied: a damaged cached copy is named as itself, not as the workdir's.
  Tokenizer(cached)
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / f".{path.name}.{os.getpid()}.tmp"
  try:
    shutil.copyfile(cached, tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)  # a copy cut short (a full disk) leaves nothing behind
  if kind == "char" and data.vocab_size and Tokenizer(path).vocab_size != data.vocab_size:
    size = Tokenizer(path).vocab_size
    path.unlink()
    raise UserError(
      f"data.vocab_size={data.vocab_size}, but the training text's characters make a char "
      f"vocabulary of {size} ids (with the 5 special ones): set data.vocab_size={size}, or 0 "
      "for the tokenizer's own size"
    )
  return path


def _characters(corpus: Corpus | FileCorpus, split: str) -> set[str]:
  """Every character of the split's text, both sides."""
  chars: set[str] = set()
  for chunk in corpus.chunks(split):
    for src, tgt in chunk:
      chars.update(src)
      chars.update(tgt)
  return chars


def _tokenizer_sentences(corpus: Corpus | FileCorpus, split: str, num_pairs: int) -> Iterator[str]:
  """Both sides of the first `num_pairs` training pairs with text on both sides, interleaved;
  of running text (dataset text), its first 2 x `num_pairs` lines that hold text."""
  taken = 0
  for chunk in corpus.chunks(split):
    for src, tgt in chunk:
      if isinstance(corpus, FileCorpus) and corpus.dataset == "text":
        if taken == 2 * num_pairs:
          return
        if tgt.strip():
          taken += 1
          yield tgt.removesuffix("\n")
        continue
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


def made_of(data: DataConfig, where: Location, tokenizer_path: Path) -> dict[str, str]:
  """What a run's training batches are made of: {"tokenizer": the tokenizer file's SHA-256,
  "train_text": the training split's fingerprint}. A stream position means nothing against
  other text, and an embedding nothing under another tokenizer of the same size. The text is
  named only where its fingerprint hashes the text itself (files, Multi30k): a tfds dataset's
  names the folder it was prepared in, which a run may move (data.tfds_data_dir)."""
  identity = {"tokenizer": _sha256(tokenizer_path)}
  corpus = Corpus.of(data, where.cache_dir)
  if isinstance(corpus, FileCorpus) or corpus.source_dir is not None:
    identity["train_text"] = corpus.fingerprint(data.train_split)
  return identity


# ------------------------------------------------------------------------------------------------
# Opening (every process)
# ------------------------------------------------------------------------------------------------


def open_split(
  data: DataConfig, where: Location, split: str, tokenizer_path: Path | None = None
) -> TokenCache:
  """The token cache of `split` encoded by `tokenizer_path` (default: the workdir's tokenizer;
  a model scored with another, e.g. an export copied in, names its own)."""
  corpus = Corpus.of(data, where.cache_dir)
  tokenizer_path = tokenizer_path or tokenizer_file(where.workdir)
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
  tokenizer = Tokenizer(tokenizer_file(where.workdir))
  if tokenizer.vocab_size != data.vocab_size:
    raise UserError(
      f"{tokenizer.model_path} has vocab_size {tokenizer.vocab_size}, not "
      f"data.vocab_size={data.vocab_size}: use another workdir or the stored "
      "model's size"
    )
  batch_tokens = batch_tokens or data.tokens_per_batch
  train = open_split(data, where, data.train_split)
  if running_text(data, task):
    return _running_text_inputs(
      data,
      where,
      tokenizer,
      train,
      task=task,
      seed=seed,
      batch_tokens=batch_tokens,
      batch_multiple=batch_multiple,
      share=share,
      prefetch=prefetch,
    )
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
    for split in (test_splits(data) if task == "translation" else ())
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
    made_of=made_of(data, where, tokenizer.model_path),
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


def read_running_ids(cache: TokenCache, tokenizer: Tokenizer) -> np.ndarray:
  """A text split's token cache as its running text of ids (`running_ids`)."""
  targets = [
    target
    for start in range(0, len(cache), batching.CHUNK)
    for _, target in cache.read(range(start, min(start + batching.CHUNK, len(cache))))
  ]
  return running_ids(targets, tokenizer.represents_newline)


def _running_text_inputs(
  data: DataConfig,
  where: Location,
  tokenizer: Tokenizer,
  train: TokenCache,
  *,
  task: str,
  seed: int,
  batch_tokens: int,
  batch_multiple: int,
  share: Share,
  prefetch: int,
) -> Inputs:
  """Inputs of a language model on running text: training windows cut anywhere in the text,
  validation as consecutive windows of the validation text (every id after its first is a
  target once, reading the ids before it)."""
  ids = read_running_ids(train, tokenizer)
  rows = batching.rows_per_batch(data.max_len, batch_tokens, batch_multiple)
  mlm = (tokenizer.vocab_size, data.mlm_select_rate) if task == "mlm" else None
  stream = running_text_stream(
    ids, data.max_len, rows, seed=seed, mlm=mlm, prefetch=prefetch, share=share
  )
  log.info("%s: %d tokens of running text", data.train_split, len(ids))
  counts = {"pairs": len(train), "empty": 0, "too_long": 0, "kept": len(train)}
  validation = read_running_ids(open_split(data, where, data.eval_split), tokenizer)
  batches = running_eval_batches(
    validation,
    data.max_len,
    data.eval_batch_size,
    shifted=task == "lm",
    share=share,
    limit=data.eval_windows,
  )
  if task == "mlm":
    batches = _eval_batches_for_task(task, seed, data.mlm_select_rate, batches, tokenizer, share)
  return Inputs(
    tokenizer,
    stream,
    batches,
    [],
    train_pairs=counts,
    validation=None,
    made_of=made_of(data, where, tokenizer.model_path),
  )


def running_eval_batches(
  ids: np.ndarray,
  length: int,
  batch_size: int,
  *,
  shifted: bool,
  share: Share = Share(),
  limit: int = 0,
) -> list[Batch]:
  """Validation batches of running text, this process's rows of each: consecutive windows
  (`running_windows` when `shifted`, for the LM: "inputs" and "targets" [B, length]; else
  windows of `length`: "targets" and "weights" [B] for `_eval_batches_for_task`), the last
  batch filled with rows of padding. `limit` > 0 keeps that many windows, evenly spread."""
  if shifted:
    windows = running_windows(ids, length)
  else:  # [w, length], the last one right-padded
    windows = np.full(-(-len(ids) // length) * length, PAD_ID, np.int32)
    windows[: len(ids)] = ids
    windows = windows.reshape(-1, length)
  if not len(windows):
    raise UserError(
      f"the validation text has {len(ids)} tokens, too few for one window: give more "
      "validation text (data.eval_files or data.validation_fraction)"
    )
  if 0 < limit < len(windows):
    windows = windows[np.linspace(0, len(windows) - 1, limit).round().astype(np.int64)]
  batches: list[Batch] = []
  for start in range(0, len(windows), batch_size):
    filled = np.full((batch_size, windows.shape[1]), PAD_ID, np.int32)
    chunk = windows[start : start + batch_size]
    filled[: len(chunk)] = chunk
    rows = share.rows(np.arange(batch_size))
    weights = (rows < len(chunk)).astype(np.float32)
    if shifted:
      batches.append({"inputs": filled[rows, :-1], "targets": filled[rows, 1:]})
    else:
      batches.append({"targets": filled[rows], "weights": weights})
  return batches


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
