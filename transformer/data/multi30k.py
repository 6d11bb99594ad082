"""Multi30k English-German as a local tensorflow-datasets builder, and a reader of sentence pairs.

The raw corpus ships with the package (`transformer/data/corpora/multi30k/`, see its README for
origin, terms and citations), so preparing the dataset never touches the network. The builder
writes ArrayRecord files, which `as_data_source()` reads with random access and without
TensorFlow.

Every split keeps the order of the files (`disable_shuffling=True`): line i of a split is example i,
so translations of the test sets stay aligned with their references.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import logging
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from google.protobuf import json_format

from transformer.errors import MissingFile, UserError

log = logging.getLogger(__name__)

# Shipped inside the package, so an installed copy finds it too.
DEFAULT_SOURCE_DIR = Path(__file__).resolve().parent / "corpora" / "multi30k"
LANGUAGES = ("en", "de")
# tfds split name -> file stem in the corpus folder (`<stem>.<lang>.gz`).
SPLIT_FILES = {
  "train": "train",
  "validation": "val",
  "test_2016": "test_2016_flickr",
  "test_2017": "test_2017_flickr",
}
SPLIT_SIZES = {"train": 29000, "validation": 1014, "test_2016": 1000, "test_2017": 1000}

_CITATION = """\
@inproceedings{elliott-etal-2016-multi30k,
  title = {Multi30K: Multilingual English-German Image Descriptions},
  author = {Elliott, Desmond and Frank, Stella and Sima'an, Khalil and Specia, Lucia},
  booktitle = {Proceedings of the 5th Workshop on Vision and Language},
  pages = {70--74},
  year = {2016},
  doi = {10.18653/v1/W16-3210},
}
@inproceedings{elliott-etal-2017-findings,
  title = {Findings of the Second Shared Task on Multimodal Machine Translation and
           Multilingual Image Description},
  author = {Elliott, Desmond and Frank, Stella and Barrault, Lo{\\"i}c and Bougares, Fethi and
            Specia, Lucia},
  booktitle = {Proceedings of the Second Conference on Machine Translation},
  pages = {215--233},
  year = {2017},
}
"""


def require_file(path: Path) -> None:
  """Raises a one-line FileNotFoundError that names the missing file and the fix."""
  if not path.is_file():
    raise MissingFile(
      f"Multi30k file {path} is missing: copy the corpus into {path.parent} "
      f"or pass source_dir= pointing at a directory with the *.en.gz/*.de.gz files."
    )


def iter_lines(path: Path) -> Iterator[str]:
  """The lines of a gzip-compressed UTF-8 text file, one at a time, without their `\\n`.

  A damaged, cut-short or non-UTF-8 file raises a one-line ValueError naming the file and line.
  Lines split on `\\n` only: `str.splitlines` would also split on \\x1c, \\u2028 and other
  characters that may occur inside a sentence.
  """
  require_file(path)
  number = 0
  try:
    with gzip.open(path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        try:
          yield raw.decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError as error:
          column = error.start + 1
          raise UserError(
            f"{path} line {number} is not UTF-8 (byte {raw[error.start]:#04x} at byte {column} "
            "of the line): convert the file to UTF-8 and gzip it again"
          ) from None
  except (OSError, EOFError, zlib.error) as error:
    raise UserError(
      f"{path} cannot be read at line {number + 1} ({error}): the file is cut short or damaged; "
      "copy it again or re-create it with gzip"
    ) from None


def read_lines(path: Path) -> list[str]:
  """Every line of a (small) gzip-compressed UTF-8 text file; see `iter_lines`."""
  return list(iter_lines(path))


def split_paths(source_dir: Path, stem: str) -> dict[str, Path]:
  """{lang: <stem>.<lang>.gz}, checking that both sides exist and have as many lines (read
  through once, in constant memory)."""
  paths = {lang: Path(source_dir) / f"{stem}.{lang}.gz" for lang in LANGUAGES}
  # Check all files exist before reading any, so the error names the first missing one.
  for path in paths.values():
    require_file(path)
  counts = {lang: sum(1 for _ in iter_lines(path)) for lang, path in paths.items()}
  if len(set(counts.values())) != 1:
    detail = ", ".join(f"{paths[lang]} has {counts[lang]} lines" for lang in LANGUAGES)
    raise UserError(f"Multi30k line counts differ: {detail}; the sides must be aligned.")
  if not counts["en"]:
    raise UserError(
      f"{paths['en']} and {paths['de']} hold no lines: give the {stem} split its sentence pairs"
    )
  return paths


def read_parallel(source_dir: Path, stem: str) -> dict[str, list[str]]:
  """{lang: lines} of a (small) split, checked as `split_paths` does."""
  return {lang: read_lines(path) for lang, path in split_paths(source_dir, stem).items()}


class Multi30k(tfds.core.GeneratorBasedBuilder):
  """Multi30k Task 1 (image captions), English-German, from local gzip files.

  Args (besides tfds's `data_dir`, `file_format`, ...):
    source_dir: directory holding the eight `<split>.<lang>.gz` files; defaults to the
      package's `transformer/data/corpora/multi30k`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Raw text of data/task1/raw of multi30k/dataset."
  }

  def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs: Any):
    self._source_dir = Path(source_dir) if source_dir is not None else DEFAULT_SOURCE_DIR
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Not dataset_info_from_configs(): that reads README/CITATIONS files from a
    # folder-per-dataset layout, which this single-module builder does not have.
    return tfds.core.DatasetInfo(
      builder=self,
      description="Multi30k English-German image descriptions (raw, untokenized text).",
      features=tfds.features.FeaturesDict({lang: tfds.features.Text() for lang in LANGUAGES}),
      supervised_keys=("en", "de"),
      homepage="https://github.com/multi30k/dataset",
      citation=_CITATION,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the corpus ships with the repository.
    # Check every split before writing any, so a bad corpus fails fast; then stream the pairs:
    # a WMT-sized split is never held in memory.
    paths = {split: split_paths(self._source_dir, stem) for split, stem in SPLIT_FILES.items()}
    return {split: self._generate_examples(side) for split, side in paths.items()}

  def _generate_examples(self, paths: Mapping[str, Path]):
    for i, pair in enumerate(zip(*(iter_lines(paths[lang]) for lang in LANGUAGES), strict=True)):
      yield i, dict(zip(LANGUAGES, pair, strict=True))


def source_fingerprint(source_dir: Path) -> str:
  """A short hash of the names and contents of the eight corpus files in `source_dir`.

  Contents, not sizes or times: a copy of the same corpus elsewhere (or re-checked-out) keeps
  its prepared examples, while an edited or different corpus never reuses them.
  """
  if not source_dir.is_dir():
    raise MissingFile(
      f"data.source_dir {source_dir} not found: the directory is missing; set it to a "
      f"directory holding the Multi30k files ({SPLIT_FILES['train']}.en.gz, "
      f"{SPLIT_FILES['train']}.de.gz, {SPLIT_FILES['validation']}.en.gz, ...)"
    )
  digest = hashlib.sha256()
  for stem in SPLIT_FILES.values():
    for lang in LANGUAGES:
      path = source_dir / f"{stem}.{lang}.gz"
      require_file(path)
      content = path.read_bytes()
      digest.update(f"{path.name}\0{len(content)}\0".encode())
      digest.update(content)
  return digest.hexdigest()[:16]


def prepare_multi30k(
  tfds_data_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None
) -> Multi30k:
  """The Multi30k builder with its ArrayRecord files written (once) under `tfds_data_dir`.

  Each corpus gets its own copy, in `tfds_data_dir/multi30k_sources/<source_fingerprint>`, so
  changing `source_dir` (or a file in it) never trains on examples prepared from other text.
  """
  source_dir = Path(source_dir) if source_dir is not None else DEFAULT_SOURCE_DIR
  data_dir = Path(tfds_data_dir) / "multi30k_sources" / source_fingerprint(source_dir)
  # One process at a time prepares it: two first runs at once raced on tfds's rename of the
  # finished folder. The builder is made under the lock, so it reads what the other prepared;
  # the kernel releases the lock however its holder ends.
  data_dir.mkdir(parents=True, exist_ok=True)
  with (
    open(data_dir / ".prepare.lock", "a", encoding="utf-8") as lock,
    _without_missing_info_warning(),
  ):
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
      builder = Multi30k(
        data_dir=os.fspath(data_dir), source_dir=source_dir, file_format="array_record"
      )
    except (ValueError, json_format.Error) as error:  # its dataset_info.json cut or edited
      raise UserError(
        f"the prepared Multi30k in {data_dir} is damaged ({' '.join(str(error).split())[:200]}): "
        "delete that folder and it is prepared again"
      ) from None
    if not builder.is_prepared():
      log.info("preparing Multi30k from %s in %s", source_dir, data_dir)
      tfds.disable_progress_bar()  # a few seconds of work; its bars would bury the run's log
      # tfds prints its own two lines to stdout, where evaluate's and translate's output goes.
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(file_format="array_record")
  return builder


@contextlib.contextmanager
def _without_missing_info_warning() -> Iterator[None]:
  """tfds warns (through absl) that a folder it has not prepared yet "has no
  dataset_info.json": on a fresh cache, every first run printed it."""

  def keep(record: logging.LogRecord) -> bool:
    return "has no dataset_info.json" not in record.getMessage()

  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


def _decode(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def load_pairs(
  dataset_name: str,
  split: str,
  source_lang: str,
  target_lang: str,
  tfds_data_dir: str | os.PathLike,
  *,
  source_dir: str | os.PathLike | None = None,
  builder_kwargs: Mapping[str, Any] | None = None,
) -> list[tuple[str, str]]:
  """(source, target) sentence pairs of one split, in dataset order.

  Args:
    dataset_name: "multi30k" for the local builder, or any tfds name whose examples are
      {lang: text}, e.g. "wmt14_translate/de-en", prepared as ArrayRecord through
      `tfds.data_source` (a copy prepared earlier as TFRecord in the same dir needs TF).
    split: a tfds split, slices allowed ("train[:2000]").
    source_lang, target_lang: feature keys, e.g. "en", "de".
    tfds_data_dir: where tfds keeps prepared datasets.
    source_dir: Multi30k only: directory of the raw .gz files.
    builder_kwargs: other datasets only: extra tfds builder arguments.
  Returns:
    A list of (source, target) str pairs.
  """
  if dataset_name == "multi30k":
    source = prepare_multi30k(tfds_data_dir, source_dir).as_data_source(split=split)
  else:
    # tfds.data_source only defaults to ArrayRecord when given no data_dir and no
    # builder_kwargs; otherwise it would prepare TFRecord files, unreadable without TF.
    builder_kwargs = {"file_format": "array_record", **(builder_kwargs or {})}
    source = tfds.data_source(
      dataset_name, split=split, data_dir=os.fspath(tfds_data_dir), builder_kwargs=builder_kwargs
    )
  examples = _read_all(source)
  return [(_decode(ex[source_lang]), _decode(ex[target_lang])) for ex in examples]


def _read_all(source: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  # One batched read instead of len(source) single-record reads.
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(range(len(source))))
  return [source[i] for i in range(len(source))]
