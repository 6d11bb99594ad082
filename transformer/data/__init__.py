"""Input pipeline: text (tfds) -> SentencePiece ids -> padded numpy batches.

Dimension key (as in the package docstring): B batch, S source length, T target length,
V vocabulary size.
"""

from transformer.data.multi30k import (
  DEFAULT_SOURCE_DIR,
  SPLIT_SIZES,
  Multi30k,
  load_pairs,
  prepare_multi30k,
)
from transformer.data.pipeline import (
  BatchIterator,
  Examples,
  LengthStats,
  default_length_buckets,
  encode_pairs,
  eval_batches,
  lm_train_batches,
  lm_windows,
  make_examples,
  mask_tokens,
  translation_train_batches,
)
from transformer.data.tokenizer import (
  BOS_ID,
  EOS_ID,
  MASK_ID,
  PAD_ID,
  UNK_ID,
  Tokenizer,
  load_or_train_tokenizer,
  pair_sentences,
  train_sentencepiece,
)

__all__ = [
  "BOS_ID",
  "DEFAULT_SOURCE_DIR",
  "EOS_ID",
  "MASK_ID",
  "PAD_ID",
  "SPLIT_SIZES",
  "UNK_ID",
  "BatchIterator",
  "Examples",
  "LengthStats",
  "Multi30k",
  "Tokenizer",
  "default_length_buckets",
  "encode_pairs",
  "eval_batches",
  "lm_train_batches",
  "lm_windows",
  "load_or_train_tokenizer",
  "load_pairs",
  "make_examples",
  "mask_tokens",
  "pair_sentences",
  "prepare_multi30k",
  "train_sentencepiece",
  "translation_train_batches",
]
