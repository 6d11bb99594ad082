"""Your own text files as a corpus: running text for the language models, parallel files for
translation, read in chunks like the tfds corpora (`transformer.data.corpus.Corpus`).

  text      data.train_files = ("input.txt",) or globs: each file is a document. A split's
            records are its lines in order, each with its line break (a line over
            `PIECE_CHARS` characters is cut into pieces), and an empty record after each
            document's last line; the language models join them into running text
            (`transformer.data.pipeline.running_ids`).
  parallel  ("train.{lang}.gz",): line i of train.en.gz and line i of train.de.gz are a pair
            ({lang} is data.source_lang, then data.target_lang); or ("train.tsv",): one
            source<TAB>target pair a line.

Files are UTF-8, gzip-compressed or not (told by their first bytes, not their names); lines end
at "\\n" only (a parallel line ending in "\\r\\n" is refused, as its sentence would keep the
"\\r"). A split with no eval_files holds out the last data.validation_fraction of the training
files: of their characters (text, cut as nanoGPT cuts its 90/10 split) or of their pairs
(parallel). Missing files, empty files, parallel sides of different lengths and bytes that
are not UTF-8 are one-line errors naming the file (and line).

A split's fingerprint hashes the contents of its files (with their names) and how it was cut,
never their paths or times: the same text elsewhere reuses its token cache.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformer.data.config import DataConfig
from transformer.errors import MissingFile, UserError

Pair = tuple[str, str]
PIECE_CHARS = 65_536  # a longer line is cut into records of this many characters
GZIP_MAGIC = b"\x1f\x8b"
Source = Path | tuple[Path, Path]  # one file (text, .tsv) or a (source, target) pair of files


def resolve(pattern: str, key: str) -> list[Path]:
  """The files a path or glob names, in sorted order; none is a one-line error."""
  expanded = os.path.expanduser(pattern)
  if glob.has_magic(expanded):
    matches = sorted(Path(p) for p in glob.glob(expanded) if Path(p).is_file())
    if not matches:
      raise MissingFile(f"data.{key}: no file matches {pattern!r}: check the path or the glob")
    return matches
  path = Path(expanded)
  if path.is_dir():
    raise MissingFile(
      f"data.{key}: {path} is a folder: name its files, or a glob such as {path / '*.txt'}"
    )
  if not path.is_file():
    raise MissingFile(f"data.{key}: {path} does not exist: check the path")
  return [path]


def _open(path: Path) -> io.BufferedIOBase:
  with open(path, "rb") as f:
    compressed = f.read(2) == GZIP_MAGIC
  return gzip.open(path, "rb") if compressed else open(path, "rb")


def lines(path: Path) -> Iterator[tuple[int, str]]:
  """(line number, text with its "\\n") of a UTF-8 file, gzip or not; bytes that are not UTF-8
  or a damaged gzip stream are a one-line error naming the file and line."""
  number = 0
  try:
    with _open(path) as f:
      for number, raw in enumerate(f, start=1):
        try:
          yield number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
          raise UserError(
            f"{path} line {number} is not UTF-8 (byte {raw[error.start]:#04x} at byte "
            f"{error.start + 1} of the line): convert the file to UTF-8"
          ) from None
  except (OSError, EOFError, zlib.error) as error:
    raise UserError(
      f"{path} cannot be read at line {number + 1} ({error}): the file is cut short or "
      "damaged; copy it again"
    ) from None


@dataclasses.dataclass(frozen=True)
class Facts:
  """A file's SHA-256 (of its name and decompressed bytes), characters and lines."""

  sha256: str
  chars: int
  lines: int


_FACTS: dict[tuple[str, int, int], Facts] = {}


def facts(path: Path) -> Facts:
  """What a split's fingerprint and hold-out need of a file, read once per process (kept by
  path, size and modification time); an empty file is an error."""
  stat = path.stat()
  key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
  if key not in _FACTS:
    digest = hashlib.sha256(f"{path.name}\0".encode())
    chars = count = 0
    for count, line in lines(path):  # noqa: B007 (the last number is the count)
      digest.update(line.encode("utf-8"))
      chars += len(line)
    if not chars:
      raise UserError(f"{path} is empty: give it text, or leave it out of the data files")
    _FACTS[key] = Facts(digest.hexdigest(), chars, count)
  return _FACTS[key]


def _name_of(pattern: str) -> str:
  """A test set's name from its file entry: "data/test_2016_flickr.{lang}.gz" ->
  "test_2016_flickr"."""
  name = os.path.basename(pattern).replace("{lang}", "")
  name = re.sub(r"(\.(gz|tsv|txt|text))+$", "", name)
  name = re.sub(r"[*?\[\]]", "", name).strip("._-")
  return name or "test"


def test_names(data: DataConfig) -> list[str]:
  """The names of data.test_files' test sets, distinct and apart from the other splits."""
  names: list[str] = []
  taken = {data.train_split, data.eval_split}
  for pattern in data.test_files:
    name, k = _name_of(pattern), 2
    while name in taken:
      name, k = f"{_name_of(pattern)}_{k}", k + 1
    taken.add(name)
    names.append(name)
  return names


@dataclasses.dataclass(frozen=True)
class FileCorpus:
  """The splits of data.train_files / eval_files / test_files (see the module docstring), with
  the interface of `Corpus`: `fingerprint(split)`, `chunks(split)`, `pairs(split)`."""

  dataset: str  # "text" or "parallel"
  source_lang: str
  target_lang: str
  patterns: dict[str, tuple[str, ...]]  # split -> its entries; the held-out split: ()
  keys: dict[str, str]  # split -> the config key that names its files
  train_split: str
  eval_split: str
  validation_fraction: float

  @classmethod
  def of(cls, data: DataConfig) -> FileCorpus:
    patterns = {data.train_split: data.train_files, data.eval_split: data.eval_files}
    keys = {data.train_split: "train_files", data.eval_split: "eval_files"}
    for name, pattern in zip(test_names(data), data.test_files, strict=True):
      patterns[name], keys[name] = (pattern,), "test_files"
    return cls(
      data.dataset,
      data.source_lang,
      data.target_lang,
      patterns,
      keys,
      data.train_split,
      data.eval_split,
      data.validation_fraction,
    )

  @property
  def held_out(self) -> bool:
    """Whether validation is the tail of the training files (no eval_files)."""
    return not self.patterns[self.eval_split]

  def _check(self, split: str) -> None:
    if split not in self.patterns:
      raise UserError(
        f"split {split!r} is not one of this run's files ({', '.join(self.patterns)}): name "
        "a split of the data block, or give files with --src/--ref"
      )

  def sources(self, split: str) -> list[Source]:
    """The files of `split` (of the training split when validation is held out)."""
    self._check(split)
    if split == self.eval_split and self.held_out:
      split = self.train_split
    key, out = self.keys[split], list[Source]()
    for pattern in self.patterns[split]:
      if self.dataset == "parallel" and "{lang}" in pattern:
        sides = [
          resolve(pattern.replace("{lang}", lang), key)
          for lang in (self.source_lang, self.target_lang)
        ]
        if len(sides[0]) != len(sides[1]):
          raise UserError(
            f"data.{key} entry {pattern!r} matches {len(sides[0])} {self.source_lang} files "
            f"but {len(sides[1])} {self.target_lang} files: every file needs its other side"
          )
        out += list(zip(*sides, strict=True))
      else:
        out += resolve(pattern, key)
    return out

  # -- what a split holds -----------------------------------------------------------------------

  def _units(self, sources: list[Source]) -> int:
    """What the hold-out cuts: characters (text) or pairs (parallel), over all files."""
    if self.dataset == "text":
      return sum(facts(p).chars for p in sources if isinstance(p, Path))
    total = 0
    for source in sources:
      if isinstance(source, tuple):
        counts = [facts(p).lines for p in source]
        if counts[0] != counts[1]:
          raise UserError(
            f"{source[0]} has {counts[0]} lines but {source[1]} has {counts[1]}: the two "
            "sides of a parallel file must be line-aligned"
          )
        total += counts[0]
      else:
        total += facts(source).lines
    return total

  def _range(self, split: str, sources: list[Source]) -> tuple[int, int | None]:
    """[start, end) of the units of `sources` that `split` takes."""
    if not self.held_out or split not in (self.train_split, self.eval_split):
      return 0, None
    cut = int(self._units(sources) * (1 - self.validation_fraction))
    if split == self.train_split:
      return 0, cut
    return cut, None

  def fingerprint(self, split: str) -> str:
    """A short hash naming `split`'s text: its files' names and contents, how it was cut."""
    sources = self.sources(split)
    identity: dict[str, Any] = {
      "dataset": self.dataset,
      "format": 1,
      "files": [
        [facts(p).sha256 for p in s] if isinstance(s, tuple) else facts(s).sha256 for s in sources
      ],
      "range": self._range(split, sources),
    }
    if self.dataset == "parallel":
      identity["languages"] = [self.source_lang, self.target_lang]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

  def records(self, split: str) -> Iterator[Pair]:
    """`split`'s (source, target) records in file order: text ("", a line or piece; "" after
    each document) or parallel (source line, target line)."""
    sources = self.sources(split)
    start, end = self._range(split, sources)
    if self.dataset == "text":
      yield from _text_records([s for s in sources if isinstance(s, Path)], start, end)
    else:
      yield from _parallel_records(sources, start, end, self._units(sources))

  def chunks(self, split: str, size: int = 65_536) -> Iterator[list[Pair]]:
    """The split's records, `size` at a time."""
    chunk: list[Pair] = []
    for record in self.records(split):
      chunk.append(record)
      if len(chunk) == size:
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  def pairs(self, split: str) -> list[Pair]:
    return list(self.records(split))


def _text_records(paths: list[Path], start: int, end: int | None) -> Iterator[Pair]:
  """Records of the characters [start, end) of the documents `paths` end to end (see the
  module docstring); a document's end marker goes with its last character."""
  position = 0  # characters before the current line
  for path in paths:
    facts(path)  # an empty file is an error before anything of it is read
    last = position + facts(path).chars
    for _, line in lines(path):
      lo, hi = max(start, position), min(len(line) + position, end if end is not None else last)
      for piece_start in range(lo, hi, PIECE_CHARS):
        yield "", line[piece_start - position : min(hi, piece_start + PIECE_CHARS) - position]
      position += len(line)
    if start < last and (end is None or last <= end):
      yield "", ""


def _parallel_records(
  sources: list[Source], start: int, end: int | None, total: int
) -> Iterator[Pair]:
  """Pairs [start, end) of the parallel files `sources` end to end."""
  if not total:
    raise UserError(f"{sources[0]} holds no pairs: give the split its sentence pairs")
  index = 0
  for source in sources:
    for pair in _pairs_of(source):
      if start <= index and (end is None or index < end):
        yield pair
      index += 1


def _pairs_of(source: Source) -> Iterator[Pair]:
  if isinstance(source, tuple):
    for (number, src), (_, tgt) in zip(lines(source[0]), lines(source[1]), strict=False):
      _check_line_end(source[0], number, src)
      _check_line_end(source[1], number, tgt)
      yield src.removesuffix("\n"), tgt.removesuffix("\n")
    return
  for number, line in lines(source):
    _check_line_end(source, number, line)
    fields = line.removesuffix("\n").split("\t")
    if len(fields) != 2:
      raise UserError(
        f"{source} line {number} has {len(fields) - 1} tabs: a .tsv pair is source<TAB>target, "
        "one tab a line"
      )
    yield fields[0], fields[1]


def _check_line_end(path: Path, number: int, line: str) -> None:
  """Refuses a parallel line ending in "\\r\\n" (Windows line ends): lines end at "\\n" only,
  so every sentence would keep a carriage return, learned and emitted as part of the text."""
  if line.endswith(("\r\n", "\r")):
    raise UserError(
      f"{path} line {number} ends with a carriage return (Windows line ends, \\r\\n), which "
      "would be kept in every sentence: convert the file to \\n line ends (e.g. dos2unix)"
    )
