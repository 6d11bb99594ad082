"""What a run reads and how it is batched: the `data` block of the run's configuration."""

from __future__ import annotations

import dataclasses

from transformer.data.tokenizer import NUM_SPECIAL, check_vocab_size
from transformer.errors import UserError

TOKENIZER_TYPES = ("unigram", "bpe", "char", "byte")  # SentencePiece's two, and characters, bytes
FILE_DATASETS = ("text", "parallel")  # read from data.train_files / eval_files / test_files


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus, tokenizer and batching of a run.

  Attributes:
    dataset: "multi30k" (shipped with the package), any tfds name, e.g.
      "wmt14_translate/de-en", or text files of your own: "text" (running text, for lm and mlm:
      each file a document, documents joined by EOS, windows cut across line breaks) or
      "parallel" (translation pairs: line i of the source file and line i of the target file,
      or one tab-separated line each). See `transformer.data.files`.
    train_files, eval_files, test_files: with dataset text or parallel, the files of each split,
      as paths or globs (matches in sorted order), gzip or not. A parallel file names both sides
      with a {lang} placeholder ("data/train.{lang}.gz" reads train.en.gz and train.de.gz) or
      is a .tsv (source<TAB>target). Each entry of test_files is one test set, named by its
      file. No eval_files: the last `validation_fraction` of the training text (characters of
      text, pairs of parallel) is held out for validation.
    validation_fraction: the share of the training files held out when eval_files is empty.
    source_dir: Multi30k text files; "" = the copy shipped in transformer/data/corpora.
    tfds_data_dir: where tfds prepares datasets; "" = $TFDS_DATA_DIR, else <cache_dir>/tfds.
    cache_dir: where the token caches, tokenizers and tfds data are kept for every run that reads
      the same text; "" = $TRANSFORMER_CACHE_DIR, else <workdir>/cache with several processes
      (it must be visible to every host), else ~/.cache/transformer.
    source_lang, target_lang: the feature names of the two sides.
    train_split, eval_split, test_splits: tfds split names (slices allowed: "train[:2000]").
    vocab_size: V of the joint vocabulary, special ids included (also the model's vocabulary).
      With tokenizer_type char or byte, 0 takes the tokenizer's own size (the training text's
      characters + 5, or 256 + 5), recorded in the run's config.json once known.
    tokenizer_type: "unigram" or "bpe" (SentencePiece, trained on the text), "char" (one id per
      character of the training text, others map to <unk>) or "byte" (UTF-8 bytes).
    tokenizer_sentences: how many sentences (both sides counted) train the tokenizer.
    max_len: tokens per sequence, EOS included; longer training pairs are dropped (or cut,
      with `truncate`), longer evaluation pairs are cut.
    tokens_per_batch: target tokens (padding included) of one batch over all processes; with
      gradient accumulation each of the k micro-batches of an update holds this many.
    length_buckets: padded lengths of the training batches; () = `default_length_buckets`.
    packing: several pairs per row of max_len tokens, each attending only to itself, instead
      of one pair per row in length buckets: almost no padding, one batch shape.
    eval_batch_size: sentences per evaluation and translation batch, over all processes.
    eval_windows: running text (dataset text): validate on this many windows spread evenly over
      the validation text (a cheaper evaluation during training); 0 = every window.
    mlm_select_rate: the masked-LM task's share of selected tokens (BERT: 0.15).
  """

  dataset: str = "multi30k"
  train_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()
  test_files: tuple[str, ...] = ()
  validation_fraction: float = 0.1
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
  eval_windows: int = 0
  mlm_select_rate: float = 0.15

  def __post_init__(self):
    for name in ("max_len", "tokens_per_batch", "eval_batch_size", "tokenizer_sentences"):
      if getattr(self, name) <= 0:
        raise UserError(f"data.{name} must be positive, got {getattr(self, name)}")
    if self.tokenizer_type not in TOKENIZER_TYPES:
      raise UserError(
        f"data.tokenizer_type={self.tokenizer_type!r} is unknown: use one of {TOKENIZER_TYPES}"
      )
    if self.vocab_size == 0 and self.tokenizer_kind == "sentencepiece":
      raise UserError(
        f"data.vocab_size=0 leaves no room for text: it needs the {NUM_SPECIAL} special pieces "
        "plus one per distinct character of the training text: raise data.vocab_size (0, the "
        "tokenizer's own size, is for tokenizer_type char or byte)"
      )
    check_vocab_size(self.vocab_size, self.tokenizer_kind)
    # Checked for every dataset, not only those that read it: config.json records it, and a
    # NaN there is not JSON.
    if not 0.0 <= self.validation_fraction < 1.0:  # NaN fails every comparison
      raise UserError(
        "data.validation_fraction must be a finite number in [0, 1) (the share of the training "
        f"files held out), got {self.validation_fraction}"
      )
    self._check_files()
    if self.eval_windows < 0:
      raise UserError(f"data.eval_windows must be >= 0 (0 = all), got {self.eval_windows}")
    if self.eval_windows and self.dataset != "text":
      raise UserError(
        f"data.eval_windows={self.eval_windows} limits the validation windows of running "
        f"text (data.dataset=text), but this run validates on the sentences of "
        f"data.dataset={self.dataset}: leave data.eval_windows at 0"
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

  @property
  def tokenizer_kind(self) -> str:
    """ "sentencepiece" (unigram, bpe), "char" or "byte": which `Tokenizer` the run makes."""
    return self.tokenizer_type if self.tokenizer_type in ("char", "byte") else "sentencepiece"

  @property
  def from_files(self) -> bool:
    """Whether the text comes from data.train_files etc. (dataset text or parallel)."""
    return self.dataset in FILE_DATASETS

  def _check_files(self) -> None:
    keys = ("train_files", "eval_files", "test_files")
    if not self.from_files:
      for key in keys:
        if getattr(self, key):
          raise UserError(
            f"data.{key} is read only with data.dataset=text or parallel, not "
            f"{self.dataset!r}: set data.dataset, or leave data.{key} empty"
          )
      return
    if not self.train_files:
      raise UserError(
        f"data.dataset={self.dataset} reads data.train_files, which is empty: give the "
        "training text, e.g. --config.data.train_files=input.txt"
      )
    for key in keys:
      for pattern in getattr(self, key):
        if not pattern.strip():
          raise UserError(f"data.{key} has an empty entry: give a path or a glob")
        parallel = "{lang}" in pattern or pattern.removesuffix(".gz").endswith(".tsv")
        if self.dataset == "parallel" and not parallel:
          raise UserError(
            f"data.{key} entry {pattern!r} names one file, but a parallel dataset reads two "
            "sides: write the language as {lang} (train.{lang}.txt reads train.en.txt and "
            "train.de.txt) or give a .tsv of source<TAB>target lines"
          )
    if not self.eval_files and not self.validation_fraction > 0:
      raise UserError(
        "no validation text: give data.eval_files, or hold out part of the training files "
        "with data.validation_fraction (e.g. 0.1)"
      )
