"""The joint SentencePiece tokenizer: special ids, round trips, reloading, determinism."""

import os

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
from transformer.errors import UserError

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


# ------------------------------------------------------------------------------------------------
# char and byte vocabularies: one interface, one loader
# ------------------------------------------------------------------------------------------------


def random_text(rng, n: int) -> str:
  """Arbitrary Unicode: ASCII, accents, CJK, emoji, combining marks, tabs and line breaks."""
  pools = [range(0x20, 0x7F), range(0xC0, 0x250), range(0x4E00, 0x4E40), range(0x1F600, 0x1F640)]
  pools += [range(0x300, 0x310), [0x9, 0xA, 0x2028]]
  return "".join(chr(int(rng.choice(list(pools[rng.integers(len(pools))])))) for _ in range(n))


def test_byte_vocabulary_round_trips_any_text(tmp_path):
  from transformer.data.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, write_byte_vocab

  tokenizer = Tokenizer(write_byte_vocab(tmp_path / "vocab.json"))
  assert isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size == BYTE_VOCAB_SIZE == 261
  rng = np.random.default_rng(0)
  texts = [random_text(rng, 200) for _ in range(20)] + ["", "\x00\x7f"]
  ids = tokenizer.encode(texts)
  for text, row in zip(texts, ids, strict=True):
    assert row == [b + 5 for b in text.encode("utf-8")]  # bytes after the 5 special ids
  assert tokenizer.decode([row + [EOS_ID, 9] for row in ids]) == texts  # stops at EOS


def test_char_vocabulary_round_trips_its_characters_and_maps_others_to_unk(tmp_path):
  from transformer.data.tokenizer import CharTokenizer, write_char_vocab

  rng = np.random.default_rng(1)
  text = random_text(rng, 3000)
  tokenizer = Tokenizer(write_char_vocab(tmp_path / "vocab.json", text))
  assert isinstance(tokenizer, CharTokenizer)
  assert tokenizer.vocab_size == 5 + len(set(text))
  assert tokenizer.decode(tokenizer.encode([text])) == [text]
  assert tokenizer.chars == sorted(set(text))  # ids in code-point order
  assert tokenizer.encode(["\u0394"]) == [[UNK_ID]] and "\u0394" not in text
  assert tokenizer.decode([[UNK_ID, PAD_ID, BOS_ID]]) == ["\ufffd"]
  assert tokenizer.pieces([EOS_ID, 5]) == ["</s>", tokenizer.chars[0]]


def test_one_loader_dispatches_on_the_file(tmp_path, tokenizer):
  from transformer.data.tokenizer import SentencePieceTokenizer, tokenizer_file, write_char_vocab

  assert isinstance(tokenizer, SentencePieceTokenizer)
  assert Tokenizer(tokenizer.model_path).encode(["a dog"]) == tokenizer.encode(["a dog"])
  assert tokenizer_file(tmp_path).name == MODEL_FILENAME  # none yet: the SentencePiece name
  write_char_vocab(tmp_path / "vocab.json", "abc")
  assert (
    tokenizer_file(tmp_path).name == "vocab.json"
    and Tokenizer(tmp_path / "vocab.json").kind == "char"
  )


@pytest.mark.parametrize(
  "content, message",
  [
    (b"not json", "is not a vocabulary file"),
    (b'{"kind": "words"}', "is not a char or byte vocabulary"),
    (b'{"kind": "char", "chars": ["ab"]}', "must list distinct single characters"),
  ],
)
def test_a_damaged_vocab_file_is_one_line(tmp_path, content, message):
  (tmp_path / "vocab.json").write_bytes(content)
  with pytest.raises(UserError, match=message):
    Tokenizer(tmp_path / "vocab.json")


def test_sentences_longer_than_sentencepieces_default_train_the_tokenizer(tmp_path):
  """Running text arrives in records of up to 65,536 characters: SentencePiece's default skips
  sentences over 4,192 bytes silently, and their characters became unknown pieces."""
  rng = np.random.default_rng(0)
  letters = list("abcdefghijklmnop")  # "q" and "z" only in the long sentence
  words = ["".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(2000)]
  sentences = [" ".join(words[i : i + 10]) for i in range(0, 2000, 10)]
  sentences.append("zebra quokka " * 700)  # 9,100 bytes
  path = train_sentencepiece(sentences, tmp_path / "spm.model", vocab_size=60)
  (ids,) = Tokenizer(path).encode(["zebra quokka"])
  assert UNK_ID not in ids


def test_a_trained_tokenizer_is_readable_by_others(tmp_path):
  """Tokenizers in the shared cache are read by other users' runs: the file gets the mode of
  any file the process writes (0666 less the umask), not mkstemp's 0600."""
  umask = os.umask(0o022)
  try:
    path = train_sentencepiece(
      [f"sentence {i} of some words" for i in range(200)], tmp_path / "spm.model", 30
    )
  finally:
    os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o644
