"""Everything a run reads, built from the config: tokenizer, training stream, evaluation sets."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from transformer.data.config import DataConfig
from transformer.data.multi30k import DEFAULT_SOURCE_DIR, load_pairs
from transformer.data.pipeline import (
  Batch,
  BatchIterator,
  Examples,
  default_length_buckets,
  encode_pairs,
  eval_batches,
  lm_train_batches,
  make_examples,
  mask_tokens,
  translation_train_batches,
)
from transformer.data.tokenizer import UNK_ID, Tokenizer, check_vocab_size, load_or_train_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TestSet:
  """One evaluation split: its text pairs (references in file order) and its batches."""

  name: str
  pairs: list[tuple[str, str]]
  examples: Examples
  batches: list[Batch]


@dataclasses.dataclass
class Inputs:
  tokenizer: Tokenizer
  train: Resumable
  eval_batches: list[Batch]
  test_sets: list[TestSet]


class MaskedBatches(Iterator[Batch]):
  """BERT corruption over an LM stream, seeded by the stream position so resuming is exact.

  The corruption is drawn for the global batch and sliced like the stream's rows, so with
  several processes their batches together are the single-process batch.
  """

  def __init__(
    self,
    stream: BatchIterator,
    vocab_size: int,
    seed: int,
    select_rate: float,
    *,
    process_index: int = 0,
    process_count: int = 1,
  ):
    self.stream, self.vocab_size, self.seed, self.select_rate = (
      stream,
      vocab_size,
      seed,
      select_rate,
    )
    self.shard = {"process_index": process_index, "process_count": process_count}

  def __next__(self) -> Batch:
    position = self.stream.state()
    rng = np.random.default_rng([self.seed, position["epoch"], position["batch_index"]])
    return mask_tokens(
      next(self.stream)["targets"], rng, self.vocab_size, select_rate=self.select_rate, **self.shard
    )

  def state(self) -> dict:
    return self.stream.state()

  def restore(self, state: dict) -> None:
    self.stream.restore(state)


Resumable = BatchIterator | MaskedBatches


def tfds_dir(data: DataConfig, workdir: Path) -> Path:
  """Where tfds prepares datasets: data.tfds_data_dir, else $TFDS_DATA_DIR, else workdir/tfds."""
  if data.tfds_data_dir:
    return Path(data.tfds_data_dir)
  if os.environ.get("TFDS_DATA_DIR"):
    return Path(os.environ["TFDS_DATA_DIR"])
  return workdir / "tfds"


def read_split(data: DataConfig, workdir: Path, split: str) -> list[tuple[str, str]]:
  try:
    return load_pairs(
      data.dataset,
      split,
      data.source_lang,
      data.target_lang,
      tfds_dir(data, workdir),
      source_dir=data.source_dir or DEFAULT_SOURCE_DIR,
    )
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
      f"data.dataset={data.dataset!r} is not a tensorflow-datasets name: use "
      "multi30k or a tfds dataset such as wmt14_translate/de-en"
    ) from None
  except KeyError as error:
    raise ValueError(
      f"{data.dataset} has no language {error} in split {split!r}: set "
      "data.source_lang and data.target_lang to its feature names"
    ) from None


def drop_empty(pairs: list[tuple[str, str]], split: str) -> list[tuple[str, str]]:
  """Training pairs with text on both sides; how many were dropped is reported."""
  kept = [(s, t) for s, t in pairs if s.strip() and t.strip()]
  if len(kept) < len(pairs):
    log.warning(
      "%s: %d of %d pairs have an empty side and were dropped",
      split,
      len(pairs) - len(kept),
      len(pairs),
    )
  if not kept:
    raise ValueError(f"{split} has no pair with text on both sides: check the data files")
  return kept


def report_unknown(ids: list[list[int]], split: str) -> int:
  """Counts pieces outside the vocabulary (mapped to <unk>) and reports them."""
  unknown = sum(row.count(UNK_ID) for row in ids)
  total = max(sum(len(row) for row in ids), 1)
  if unknown:
    log.warning(
      "%s: %d of %d pieces (%.3f%%) are outside the vocabulary and map to <unk>",
      split,
      unknown,
      total,
      100 * unknown / total,
    )
  return unknown


def tokenizer_for(data: DataConfig, workdir: Path, train_pairs) -> Tokenizer:
  """The run's joint SentencePiece model, trained on the training text once and kept in workdir."""
  vocab_size = data.vocab_size
  check_vocab_size(vocab_size)
  sentences = [s for pair in train_pairs[: max(data.tokenizer_sentences // 2, 1)] for s in pair]
  try:
    return load_or_train_tokenizer(workdir, sentences, vocab_size, model_type=data.tokenizer_type)
  except RuntimeError as error:
    # SentencePiece states the size the text allows only inside its message.
    if too_small := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error)):
      raise ValueError(
        f"data.vocab_size={vocab_size} is fewer pieces than the training text's "
        f"characters and the special pieces need (at least {too_small[1]}): "
        "raise data.vocab_size"
      ) from None
    if too_large := re.search(r"Vocabulary size too high.*<= (\d+)", str(error)):
      raise ValueError(
        f"data.vocab_size={vocab_size} is more pieces than the training text "
        f"supports (at most {too_large[1]}): lower data.vocab_size"
      ) from None
    raise


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
) -> Inputs:
  """Reads the dataset, trains or loads the tokenizer, and builds the run's batch streams.

  Args:
    data: the data block.
    workdir: where the tokenizer (and, by default, the prepared dataset) is kept.
    task: "translation", "lm" or "mlm": the format of the batches.
    seed: the order of the training data (and the masked-LM corruption).
    batch_tokens: tokens of one training batch; default data.tokens_per_batch. With gradient
      accumulation a batch holds k micro-batches: k times that.
    batch_multiple: rows of a training batch are a multiple of this (the data-parallel ways
      times k).
    process_index, process_count: this process's share of every batch's rows.
  """
  workdir = Path(workdir)
  batch_tokens = batch_tokens or data.tokens_per_batch
  train_pairs = drop_empty(read_split(data, workdir, data.train_split), data.train_split)
  tokenizer = tokenizer_for(data, workdir, train_pairs)
  buckets = tuple(data.length_buckets) or default_length_buckets(data.max_length)
  shard = dict(process_index=process_index, process_count=process_count)

  def examples_of(pairs, truncate, split):
    source_ids, target_ids = encode_pairs(tokenizer, pairs)
    report_unknown(source_ids + target_ids, split)
    examples, stats = make_examples(source_ids, target_ids, data.max_length, truncate=truncate)
    if stats.dropped or stats.truncated:
      log.warning(
        "%s: pairs over data.max_length=%d tokens: %d dropped, %d truncated, %d kept",
        split,
        data.max_length,
        stats.dropped,
        stats.truncated,
        stats.kept,
      )
    if not stats.kept:
      raise ValueError(
        f"{split}: every pair is longer than data.max_length={data.max_length}: raise it"
      )
    return examples

  def batches_of(examples):
    return eval_batches(examples, data.eval_batch_size, length_buckets=buckets, **shard)

  if task == "translation":
    train_examples = examples_of(train_pairs, data.truncate, data.train_split)
    train: Resumable = translation_train_batches(
      train_examples,
      tokens_per_batch=batch_tokens,
      seed=seed,
      length_buckets=buckets,
      batch_multiple=batch_multiple,
      **shard,
    )
  else:
    # Language models read one side as running text, in windows of max_length tokens.
    side = tokenizer.encode([tgt for _, tgt in train_pairs])
    rows = max(batch_tokens // data.max_length // batch_multiple, 1) * batch_multiple
    windows = lm_train_batches(side, seq_len=data.max_length, batch_size=rows, seed=seed, **shard)
    train = (
      MaskedBatches(windows, tokenizer.vocab_size, seed, data.mlm_select_rate, **shard)
      if task == "mlm"
      else windows
    )

  eval_examples = examples_of(read_split(data, workdir, data.eval_split), True, data.eval_split)
  test_sets = []
  if task == "translation":
    for split in data.test_splits:
      pairs = read_split(data, workdir, split)
      examples = examples_of(pairs, True, split)
      test_sets.append(TestSet(split, pairs, examples, batches_of(examples)))
  eval_batches_ = _eval_batches_for_task(
    task, seed, data.mlm_select_rate, batches_of(eval_examples), tokenizer, **shard
  )
  return Inputs(tokenizer, train, eval_batches_, test_sets)


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
  out = []
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
