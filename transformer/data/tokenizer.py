"""A joint SentencePiece vocabulary for source and target, trained once per run and kept on disk.

One model for both languages lets the encoder and decoder share (or tie) embeddings, as in the
paper's shared source-target BPE vocabulary. The special ids are fixed so that batches padded
with 0 and the model's BOS/EOS handling agree with the vocabulary.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

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
MODEL_FILENAME = "spm.model"


def check_vocab_size(vocab_size: int) -> None:
  """A clear error for a vocabulary with no room beyond the special pieces (SentencePiece's own
  error for it names no size)."""
  if vocab_size <= MASK_ID + 1:
    raise UserError(
      f"data.vocab_size={vocab_size} leaves no room for text: it needs the "
      f"{MASK_ID + 1} special pieces plus one per distinct character of the "
      "training text: raise data.vocab_size"
    )


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
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_name, path)  # Atomic on POSIX within one filesystem.
  except BaseException:
    Path(tmp_name).unlink(missing_ok=True)
    raise


class Tokenizer:
  """Text <-> ids with a SentencePiece model; ids follow PAD/UNK/BOS/EOS/MASK_ID above."""

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
    """V: the number of ids, specials included."""
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, without BOS/EOS (the pipeline appends EOS)."""
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    """Text of each id row [B, T]: stops at the first EOS and skips PAD and BOS."""
    return self._sp.decode([_strip_specials(row) for row in ids])


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
