"""The joint SentencePiece tokenizer: special ids, round trips, reloading, determinism."""

import numpy as np
import pytest

from transformer.data.multi30k import DEFAULT_SOURCE_DIR, read_lines
from transformer.data.tokenizer import (
  BOS_ID,
  EOS_ID,
  MASK_ID,
  MODEL_FILENAME,
  PAD_ID,
  UNK_ID,
  Tokenizer,
  load_or_train_tokenizer,
  pair_sentences,
  train_sentencepiece,
)

VOCAB_SIZE = 1000


@pytest.fixture(scope="module")
def sentences():
  pairs = list(
    zip(
      read_lines(DEFAULT_SOURCE_DIR / "train.en.gz")[:2000],
      read_lines(DEFAULT_SOURCE_DIR / "train.de.gz")[:2000],
    )
  )
  return pair_sentences(pairs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sentences):
  path = tmp_path_factory.mktemp("workdir")
  load_or_train_tokenizer(path, sentences, VOCAB_SIZE)
  return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
  return Tokenizer(model_dir / MODEL_FILENAME)


def never_read():
  raise AssertionError("a stored model must be loaded, not retrained")
  yield


def test_special_ids(tokenizer):
  assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3, 4)
  assert tokenizer.vocab_size == VOCAB_SIZE
  sp = tokenizer._sp
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
  assert sp.piece_to_id("<mask>") == MASK_ID
  assert MASK_ID in tokenizer.encode(["a <mask> dog"])[0]


def test_round_trip(tokenizer):
  # Held-out validation sentences, both languages, with umlauts and punctuation.
  texts = (
    read_lines(DEFAULT_SOURCE_DIR / "val.en.gz")[:10]
    + read_lines(DEFAULT_SOURCE_DIR / "val.de.gz")[:10]
    + ["Zwei Männer überqueren die Straße, während ein Hund bellt."]
  )
  ids = tokenizer.encode(texts)
  assert all(ids_i and min(ids_i) > MASK_ID for ids_i in ids)  # No specials, no EOS added.
  assert tokenizer.decode(ids) == texts


def test_decode_stops_at_eos_and_skips_pad_and_bos(tokenizer):
  ids = tokenizer.encode(["A dog runs.", "Ein Hund."])
  row0 = [BOS_ID] + ids[0] + [EOS_ID] + ids[1] + [PAD_ID]
  row1 = ids[1][:1] + [PAD_ID] + ids[1][1:] + [EOS_ID, EOS_ID]
  batch = np.zeros((3, 32), np.int32)
  batch[0, : len(row0)], batch[1, : len(row1)] = row0, row1
  assert tokenizer.decode(batch) == ["A dog runs.", "Ein Hund.", ""]


def test_reload_identical(model_dir, tokenizer, sentences):
  model_bytes = (model_dir / MODEL_FILENAME).read_bytes()
  reloaded = load_or_train_tokenizer(model_dir, never_read(), VOCAB_SIZE)
  assert (model_dir / MODEL_FILENAME).read_bytes() == model_bytes
  assert reloaded.encode(sentences[:50]) == tokenizer.encode(sentences[:50])
  assert sorted(p.name for p in model_dir.iterdir()) == [MODEL_FILENAME]  # No temp files left.


def test_training_is_deterministic(model_dir, tmp_path, sentences):
  path = train_sentencepiece(iter(sentences), tmp_path / "again.model", VOCAB_SIZE)
  assert path.read_bytes() == (model_dir / MODEL_FILENAME).read_bytes()


def test_vocab_size_mismatch(model_dir):
  with pytest.raises(ValueError, match="vocab_size"):
    load_or_train_tokenizer(model_dir, never_read(), VOCAB_SIZE + 1)
