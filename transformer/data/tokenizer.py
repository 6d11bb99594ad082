"""Text <-> ids: one vocabulary for source and target, made once per run and kept on disk.

Three kinds behind one interface (`Tokenizer`: `vocab_size`, `encode`, `decode`, `pieces`,
`model_path`, `kind`), each in its own file, and one loader (`Tokenizer(path)` returns the kind the
file holds):
  sentencepiece  a SentencePiece unigram or BPE model trained on the text (spm.model)
  char           the training text's characters, one id each (vocab.json: the characters)
  byte           the 256 byte values of UTF-8 (vocab.json: no list; any text, no unknowns)

One model for both languages lets the encoder and decoder share (or tie) embeddings, as in the
paper's shared source-target BPE vocabulary. The special ids are fixed for every kind so that
batches padded with 0 and the model's BOS/EOS handling agree with the vocabulary; a char or byte
vocabulary's own ids come after them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import sentencepiece as spm

from transformer.errors import MissingFile, UserError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
# Reserved as a user-defined symbol so it gets the first id after the control symbols.
MASK_ID = 4
MASK_PIECE = "<mask>"
MODEL_FILENAME = "spm.model"  # a SentencePiece model
VOCAB_FILENAME = "vocab.json"  # a char or byte vocabulary
TOKENIZER_FILENAMES = (MODEL_FILENAME, VOCAB_FILENAME)
NUM_SPECIAL = MASK_ID + 1  # ids below this are PAD, UNK, BOS, EOS, MASK in every vocabulary
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256
KINDS = ("sentencepiece", "char", "byte")


def check_vocab_size(vocab_size: int, kind: str = "sentencepiece") -> None:
  """A clear error for a vocabulary with no room beyond the special pieces (SentencePiece's own
  error for it names no size); for char and byte vocabularies 0 means "the tokenizer's own"."""
  if kind == "byte" and vocab_size not in (0, BYTE_VOCAB_SIZE):
    raise UserError(
      f"data.vocab_size={vocab_size}: a byte vocabulary has {BYTE_VOCAB_SIZE} ids (256 bytes + "
      f"{NUM_SPECIAL} special): set data.vocab_size={BYTE_VOCAB_SIZE} or 0 (the tokenizer's own)"
    )
  if kind != "sentencepiece" and vocab_size == 0:
    return
  if vocab_size <= MASK_ID + 1:
    raise UserError(
      f"data.vocab_size={vocab_size} leaves no room for text: it needs the "
      f"{MASK_ID + 1} special pieces plus one per distinct character of the "
      "training text: raise data.vocab_size"
    )


MAX_SENTENCE_BYTES = 4 * 65_536


def train_sentencepiece(
  sentences: Iterable[str],
  model_path: str | os.PathLike,
  vocab_size: int,
  *,
  model_type: str = "unigram",
  character_coverage: float = 1.0,
  num_threads: int = 1,
) -> Path:
  """Trains a SentencePiece model on `sentences` and writes it atomically to `model_path`.

  Deterministic given the sentences: the whole input is used in order (no sampling, no
  shuffling) and one thread is used, because the EM statistics summed over several threads
  differ in rounding from run to run of a different thread count.

  Args:
    sentences: raw text, one sentence per item.
    model_path: where the `.model` file goes.
    vocab_size: V, including the 4 control ids and `<mask>`.
    model_type: "unigram" or "bpe".
    character_coverage: 1.0 keeps every character seen (right for alphabets like en/de).
    num_threads: trainer threads; the output depends on this number.
  Returns:
    `model_path` as a Path.
  """
  model_path = Path(model_path)
  model_proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_writer=model_proto,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=character_coverage,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    user_defined_symbols=[MASK_PIECE],
    input_sentence_size=0,  # 0 = use every sentence; no random sample.
    # Running text comes in records of up to 65,536 characters (data/files.py), 4 bytes each at
    # most; SentencePiece skips longer sentences (its default: 4,192 bytes) without a word.
    max_sentence_length=MAX_SENTENCE_BYTES,
    shuffle_input_sentence=False,
    num_threads=num_threads,
    minloglevel=2,
  )
  _write_atomically(model_path, model_proto.getvalue())
  return model_path


def _write_atomically(path: Path, data: bytes) -> None:
  """Writes `data` so that `path` is either absent, the old file, or complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    # mkstemp makes it 0600; a tokenizer in the shared cache is read by other users' runs.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_name, path)  # Atomic on POSIX within one filesystem.
  except BaseException:
    Path(tmp_name).unlink(missing_ok=True)
    raise


class Tokenizer:
  """Text <-> ids with PAD/UNK/BOS/EOS/MASK_ID above; `Tokenizer(path)` loads whichever kind the
  file holds (a SentencePiece model, or a vocab.json of kind char or byte).

  Attributes:
    model_path: the file it was loaded from (what a run and its export carry).
    kind: "sentencepiece", "char" or "byte".
  """

  kind: ClassVar[str] = ""
  model_path: Path

  def __new__(cls, model_path: str | os.PathLike):
    if cls is not Tokenizer:
      return super().__new__(cls)
    path = Path(model_path)
    if not path.is_file():
      raise MissingFile(f"{path} is missing: the run has no tokenizer")
    kind = _vocab_kind(path) if path.name == VOCAB_FILENAME else "sentencepiece"
    return super().__new__(_CLASSES[kind])

  @property
  def vocab_size(self) -> int:
    """V: the number of ids, specials included."""
    raise NotImplementedError

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, without BOS/EOS (the pipeline appends EOS)."""
    raise NotImplementedError

  def decode(self, ids: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    """Text of each id row [B, T]: stops at the first EOS and skips PAD and BOS."""
    raise NotImplementedError

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """What each id stands for, e.g. ["\u2581apple", "\u2581un", "ve", "</s>"]."""
    raise NotImplementedError

  @property
  def represents_newline(self) -> bool:
    """Whether "\n" is text to this vocabulary (char, byte) or, as SentencePiece treats it,
    whitespace that encoding drops."""
    return self.kind != "sentencepiece"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (unigram or BPE) with the special pieces at their fixed ids."""

  kind = "sentencepiece"

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = Path(model_path)
    if not self.model_path.is_file():
      raise MissingFile(f"{self.model_path} is missing: the run has no tokenizer")
    try:
      # Read here, not by path: SentencePiece cannot open a path that is not UTF-8.
      self._sp = spm.SentencePieceProcessor(model_proto=self.model_path.read_bytes())
    except (RuntimeError, OSError) as error:
      detail = " ".join(str(error).split())[:120]
      raise UserError(
        f"{self.model_path} is not a SentencePiece model ({detail}): restore it "
        "from the run, or delete it to train a new one"
      ) from None
    expected = {
      PAD_ID: "<pad>",
      UNK_ID: "<unk>",
      BOS_ID: "<s>",
      EOS_ID: "</s>",
      MASK_ID: MASK_PIECE,
    }
    found = {i: self._sp.id_to_piece(i) for i in expected}
    if found != expected:
      raise UserError(f"{self.model_path} has special pieces {found}, expected {expected}.")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    return self._sp.decode([_strip_specials(row) for row in ids])

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self._sp.id_to_piece(int(i)) for i in ids]


SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>", MASK_PIECE)


class CharTokenizer(Tokenizer):
  """One id per character of the training text (id NUM_SPECIAL + its rank in code-point order);
  a character the training text lacked encodes as UNK_ID (and UNK or MASK decode as U+FFFD)."""

  kind = "char"

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = Path(model_path)
    self.chars: list[str] = _read_vocab(self.model_path)["chars"]
    self._ids = {c: NUM_SPECIAL + i for i, c in enumerate(self.chars)}

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + len(self.chars)

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    get = self._ids.get
    return [[get(c, UNK_ID) for c in text] for text in texts]

  def decode(self, ids: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    chars = self.chars
    return [
      "".join(chars[i - NUM_SPECIAL] if i >= NUM_SPECIAL else "\ufffd" for i in row)
      for row in map(_strip_specials, ids)
    ]

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [
      self.chars[i - NUM_SPECIAL] if i >= NUM_SPECIAL else SPECIAL_PIECES[i] for i in map(int, ids)
    ]


class ByteTokenizer(Tokenizer):
  """The UTF-8 bytes of the text, byte b as id NUM_SPECIAL + b: every text encodes, nothing is
  unknown; decoding replaces a cut-off multi-byte character with U+FFFD."""

  kind = "byte"

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = Path(model_path)
    _read_vocab(self.model_path)

  @property
  def vocab_size(self) -> int:
    return BYTE_VOCAB_SIZE

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [
      (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + NUM_SPECIAL).tolist()
      for text in texts
    ]

  def decode(self, ids: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    rows = (_strip_specials(row) for row in ids)
    return [
      bytes(i - NUM_SPECIAL for i in row if i >= NUM_SPECIAL).decode("utf-8", errors="replace")
      for row in rows
    ]

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [
      repr(bytes([i - NUM_SPECIAL]))[2:-1] if i >= NUM_SPECIAL else SPECIAL_PIECES[i]
      for i in map(int, ids)
    ]


_CLASSES: dict[str, type[Tokenizer]] = {
  "sentencepiece": SentencePieceTokenizer,
  "char": CharTokenizer,
  "byte": ByteTokenizer,
}


def _read_vocab(path: Path) -> dict:
  """vocab.json's fields, checked: {"kind": "char", "chars": [...]} or {"kind": "byte"}."""
  if not path.is_file():
    raise MissingFile(f"{path} is missing: the run has no tokenizer")
  fix = "restore it from the run, or delete it to build a new one"
  try:
    values = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise UserError(f"{path} is not a vocabulary file ({error}): {fix}") from None
  kind = values.get("kind") if isinstance(values, dict) else None
  if kind not in ("char", "byte"):
    raise UserError(f"{path} is not a char or byte vocabulary (kind {kind!r}): {fix}")
  if kind == "char":
    chars = values.get("chars")
    if (
      not isinstance(chars, list)
      or not chars
      or not all(isinstance(c, str) and len(c) == 1 for c in chars)
      or len(set(chars)) != len(chars)
    ):
      raise UserError(f"{path}: 'chars' must list distinct single characters: {fix}")
  return values


def _vocab_kind(path: Path) -> str:
  return _read_vocab(path)["kind"]


def tokenizer_filename(kind: str) -> str:
  """The file a tokenizer of `kind` ("sentencepiece", "char", "byte") is kept in."""
  return MODEL_FILENAME if kind == "sentencepiece" else VOCAB_FILENAME


def tokenizer_file(folder: str | os.PathLike) -> Path:
  """The tokenizer file in `folder` (a workdir or an exported model): vocab.json if there is
  one, else spm.model (which may be missing: loading it then names it)."""
  folder = Path(folder)
  vocab = folder / VOCAB_FILENAME
  return vocab if vocab.is_file() else folder / MODEL_FILENAME


def write_char_vocab(path: str | os.PathLike, chars: Iterable[str]) -> Path:
  """Writes a char vocabulary of `chars` (sorted by code point) to `path`, atomically."""
  ordered = sorted(set(chars))
  if not ordered:
    raise UserError(
      f"the training text has no characters to make a char vocabulary of ({path}): give text"
    )
  data = json.dumps({"kind": "char", "chars": ordered}, ensure_ascii=False, indent=0) + "\n"
  _write_atomically(Path(path), data.encode("utf-8"))
  return Path(path)


def write_byte_vocab(path: str | os.PathLike) -> Path:
  """Writes the byte vocabulary (nothing to learn: the file names the kind) to `path`."""
  _write_atomically(Path(path), (json.dumps({"kind": "byte"}) + "\n").encode())
  return Path(path)


def _strip_specials(row: Sequence[int] | np.ndarray) -> list[int]:
  row = [int(i) for i in row]
  if EOS_ID in row:
    row = row[: row.index(EOS_ID)]
  return [i for i in row if i not in (PAD_ID, BOS_ID)]


def load_or_train_tokenizer(
  model_dir: str | os.PathLike,
  sentences: Iterable[str],
  vocab_size: int,
  *,
  model_type: str = "unigram",
) -> Tokenizer:
  """The tokenizer in `model_dir/spm.model`, training it on `sentences` first if absent.

  `sentences` is only consumed when training, so a generator avoids reading text on reloads.
  Raises ValueError if a stored model has another vocabulary size than asked for.
  """
  model_path = Path(model_dir) / MODEL_FILENAME
  if not model_path.exists():
    train_sentencepiece(sentences, model_path, vocab_size, model_type=model_type)
  tokenizer = Tokenizer(model_path)
  if tokenizer.vocab_size != vocab_size:
    raise UserError(
      f"{model_path} has vocab_size {tokenizer.vocab_size}, not {vocab_size}: "
      "use another workdir or the stored model's size."
    )
  return tokenizer


def pair_sentences(pairs: Iterable[tuple[str, str]]) -> list[str]:
  """Both sides of (source, target) pairs as one list: all sources, then all targets."""
  pairs = list(pairs)
  return [src for src, _ in pairs] + [tgt for _, tgt in pairs]
