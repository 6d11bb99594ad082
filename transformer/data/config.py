"""What a run reads and how it is batched: the `data` block of the run's configuration."""

from __future__ import annotations

import dataclasses

from transformer.data.tokenizer import check_vocab_size
from transformer.errors import UserError

TOKENIZER_TYPES = ("unigram", "bpe")  # SentencePiece model types


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus, tokenizer and batching of a run.

  Attributes:
    dataset: "multi30k" (shipped with the package) or any tfds name, e.g.
      "wmt14_translate/de-en".
    source_dir: Multi30k text files; "" = the copy shipped in transformer/data/corpora.
    tfds_data_dir: where tfds prepares datasets; "" = $TFDS_DATA_DIR, else <cache_dir>/tfds.
    cache_dir: where the token caches, tokenizers and tfds data are kept for every run that reads
      the same text; "" = $TRANSFORMER_CACHE_DIR, else <workdir>/cache with several processes
      (it must be visible to every host), else ~/.cache/transformer.
    source_lang, target_lang: the feature names of the two sides.
    train_split, eval_split, test_splits: tfds split names (slices allowed: "train[:2000]").
    vocab_size: V of the joint SentencePiece model (also the model's vocabulary).
    tokenizer_type: "unigram" or "bpe".
    tokenizer_sentences: how many sentences (both sides counted) train the tokenizer.
    max_len: tokens per sequence, EOS included; longer training pairs are dropped (or cut,
      with `truncate`), longer evaluation pairs are cut.
    tokens_per_batch: target tokens (padding included) of one batch over all processes; with
      gradient accumulation each of the k micro-batches of an update holds this many.
    length_buckets: padded lengths of the training batches; () = `default_length_buckets`.
    packing: several pairs per row of max_len tokens, each attending only to itself, instead
      of one pair per row in length buckets: almost no padding, one batch shape.
    eval_batch_size: sentences per evaluation and translation batch, over all processes.
    mlm_select_rate: the masked-LM task's share of selected tokens (BERT: 0.15).
  """

  dataset: str = "multi30k"
  source_dir: str = ""
  tfds_data_dir: str = ""
  cache_dir: str = ""
  source_lang: str = "en"
  target_lang: str = "de"
  train_split: str = "train"
  eval_split: str = "validation"
  test_splits: tuple[str, ...] = ("test_2016", "test_2017")
  vocab_size: int = 8000
  tokenizer_type: str = "unigram"
  tokenizer_sentences: int = 1_000_000
  max_len: int = 64
  truncate: bool = False
  tokens_per_batch: int = 4096
  length_buckets: tuple[int, ...] = ()
  packing: bool = False
  eval_batch_size: int = 64
  mlm_select_rate: float = 0.15

  def __post_init__(self):
    for name in ("max_len", "tokens_per_batch", "eval_batch_size", "tokenizer_sentences"):
      if getattr(self, name) <= 0:
        raise UserError(f"data.{name} must be positive, got {getattr(self, name)}")
    check_vocab_size(self.vocab_size)
    if self.tokenizer_type not in TOKENIZER_TYPES:
      raise UserError(
        f"data.tokenizer_type={self.tokenizer_type!r} is unknown: use one of {TOKENIZER_TYPES}"
      )
    if any(b <= 1 for b in self.length_buckets):
      raise UserError(
        f"data.length_buckets={self.length_buckets} must be lengths > 1, e.g. (16, 32, 64)"
      )
    if self.length_buckets and max(self.length_buckets) < self.max_len:
      raise UserError(
        f"data.length_buckets={self.length_buckets} end below data.max_len="
        f"{self.max_len}: end them at {self.max_len}"
      )
    if not 0.0 < self.mlm_select_rate < 1.0:
      raise UserError(f"data.mlm_select_rate must be in (0, 1), got {self.mlm_select_rate}")
