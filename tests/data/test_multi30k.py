"""The Multi30k builder against the raw gzip files it is made from."""

import gzip
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from transformer.cli import run_cli
from transformer.data import multi30k
from transformer.data.multi30k import (
  DEFAULT_SOURCE_DIR,
  SPLIT_FILES,
  SPLIT_SIZES,
  Multi30k,
  load_pairs,
  prepare_multi30k,
)


def gz_lines(path):
  with gzip.open(path, "rb") as f:
    return f.read().decode("utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_multi30k(path)
  return path


def test_split_sizes(tfds_dir):
  builder = prepare_multi30k(tfds_dir)  # Second call reuses the prepared files.
  assert {s: builder.info.splits[s].num_examples for s in SPLIT_FILES} == SPLIT_SIZES
  sources = builder.as_data_source()
  assert {s: len(sources[s]) for s in SPLIT_FILES} == SPLIT_SIZES


@pytest.mark.parametrize("split", sorted(SPLIT_FILES))
def test_file_order_kept(tfds_dir, split):
  en = gz_lines(DEFAULT_SOURCE_DIR / f"{SPLIT_FILES[split]}.en.gz")
  de = gz_lines(DEFAULT_SOURCE_DIR / f"{SPLIT_FILES[split]}.de.gz")
  pairs = load_pairs("multi30k", split, "en", "de", tfds_dir)
  assert len(pairs) == len(en) == SPLIT_SIZES[split]
  assert pairs[0] == (en[0], de[0])
  assert pairs[-1] == (en[-1], de[-1])
  if split != "train":  # Evaluation sets: every line aligned, not only the ends.
    assert pairs == list(zip(en, de))


def test_direction_and_slice(tfds_dir):
  pairs = load_pairs("multi30k", "validation[:5]", "de", "en", tfds_dir)
  en = gz_lines(DEFAULT_SOURCE_DIR / "val.en.gz")[:5]
  de = gz_lines(DEFAULT_SOURCE_DIR / "val.de.gz")[:5]
  assert pairs == list(zip(de, en))
  assert all(isinstance(text, str) for pair in pairs for text in pair)


class FakeTranslate(tfds.core.GeneratorBasedBuilder):
  """A stand-in for a registered tfds translation dataset such as wmt14_translate/de-en."""

  VERSION = tfds.core.Version("0.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict({"de": tfds.features.Text(), "en": tfds.features.Text()}),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {"de": f"Satz {i} äöü", "en": f"sentence {i}"}


def test_any_tfds_dataset_by_name(tmp_path):
  pairs = load_pairs("fake_translate", "train", "de", "en", tmp_path)
  assert pairs == [(f"Satz {i} äöü", f"sentence {i}") for i in range(3)]


def write_corpus(directory: Path, lines_per_file: dict[str, int]) -> None:
  directory.mkdir()
  for stem in SPLIT_FILES.values():
    for lang in ("en", "de"):
      n = lines_per_file.get(f"{stem}.{lang}.gz", 2)
      text = "".join(f"{lang} {stem} line {i}\n" for i in range(n))
      with gzip.open(directory / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
        f.write(text)


def test_tiny_corpus(tmp_path):
  write_corpus(tmp_path / "src", {})
  pairs = load_pairs(
    "multi30k", "test_2017", "en", "de", tmp_path / "tfds", source_dir=tmp_path / "src"
  )
  assert pairs == [
    (f"en test_2017_flickr line {i}", f"de test_2017_flickr line {i}") for i in range(2)
  ]


def test_missing_file(tmp_path):
  write_corpus(tmp_path / "src", {})
  os.remove(tmp_path / "src" / "val.de.gz")
  builder = Multi30k(data_dir=os.fspath(tmp_path / "tfds"), source_dir=tmp_path / "src")
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare(file_format="array_record")
  message = str(error.value)
  assert "val.de.gz" in message and "source_dir" in message and "\n" not in message


def test_mismatched_line_counts(tmp_path):
  write_corpus(tmp_path / "src", {"train.de.gz": 3})
  with pytest.raises(ValueError, match=r"train\.en\.gz has 2 lines.*train\.de\.gz has 3 lines"):
    multi30k.read_parallel(tmp_path / "src", "train")
  with pytest.raises(ValueError, match="line counts differ"):
    prepare_multi30k(tmp_path / "tfds", tmp_path / "src")


def write_lines(path: Path, lines: list[str]) -> None:
  path.mkdir(exist_ok=True)
  for stem in SPLIT_FILES.values():
    for lang in ("en", "de"):
      with gzip.open(path / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
        f.write("".join(f"{lang}: {line}\n" for line in lines))


def test_each_source_dir_gets_its_own_prepared_copy(tmp_path):
  write_lines(tmp_path / "a", ["a man", "a dog"])
  write_lines(tmp_path / "b", ["a cat", "two birds", "a fish"])
  tfds_dir = tmp_path / "tfds"
  for name, lines in [
    ("a", ["a man", "a dog"]),
    ("b", ["a cat", "two birds", "a fish"]),
    ("a", ["a man", "a dog"]),
  ]:
    pairs = load_pairs("multi30k", "train", "en", "de", tfds_dir, source_dir=tmp_path / name)
    assert pairs == [(f"en: {line}", f"de: {line}") for line in lines]
  # Editing a file in place is a different corpus too.
  write_lines(tmp_path / "a", ["a horse"])
  pairs = load_pairs("multi30k", "train", "en", "de", tfds_dir, source_dir=tmp_path / "a")
  assert pairs == [("en: a horse", "de: a horse")]


def test_missing_source_dir(tmp_path):
  write_lines(tmp_path / "a", ["a man"])
  load_pairs("multi30k", "train", "en", "de", tmp_path / "tfds", source_dir=tmp_path / "a")
  with pytest.raises(FileNotFoundError) as error:
    load_pairs(
      "multi30k",
      "train",
      "en",
      "de",
      tmp_path / "tfds",
      source_dir=tmp_path / "does" / "not" / "exist",
    )
  message = str(error.value)
  assert message.startswith(f"data.source_dir {tmp_path / 'does' / 'not' / 'exist'} not found: ")
  assert "train.en.gz" in message and "\n" not in message


def gzip_bytes(text: bytes) -> bytes:
  return gzip.compress(text, mtime=0)


def test_truncated_file_names_path_and_line(tmp_path):
  text = "".join(f"sentence number {i} of a long file\n" for i in range(5000)).encode()
  whole = gzip_bytes(text)
  cut = whole[: len(whole) // 2]
  (tmp_path / "train.en.gz").write_bytes(cut)
  # Reference: what zlib itself recovers from the cut stream, line by line.
  recovered = zlib.decompressobj(wbits=31).decompress(cut)
  expected_line = recovered.count(b"\n") + 1
  assert 1 < expected_line < 5000
  with pytest.raises(ValueError) as error:
    multi30k.read_lines(tmp_path / "train.en.gz")
  message = str(error.value)
  assert f"{tmp_path / 'train.en.gz'} cannot be read at line {expected_line} " in message
  assert "gzip" in message and "\n" not in message


def test_not_gzip_names_path(tmp_path):
  (tmp_path / "val.de.gz").write_bytes(b"plain text, never compressed\n")
  with pytest.raises(ValueError, match=r"val\.de\.gz cannot be read at line 1 .*gzip"):
    multi30k.read_lines(tmp_path / "val.de.gz")


def test_invalid_utf8_names_path_and_line(tmp_path):
  (tmp_path / "train.de.gz").write_bytes(gzip_bytes(b"ein Mann\nzwei Hunde\nein Ba\xffum\n"))
  with pytest.raises(ValueError) as error:
    multi30k.read_lines(tmp_path / "train.de.gz")
  message = str(error.value)
  assert message.startswith(f"{tmp_path / 'train.de.gz'} line 3 is not UTF-8 (byte 0xff at byte 7 ")
  assert "convert the file to UTF-8" in message and "\n" not in message


def test_bad_file_is_one_cli_line(tmp_path, capsys):
  write_lines(tmp_path / "a", ["a man"])
  (tmp_path / "a" / "train.en.gz").write_bytes(gzip_bytes(b"a m\xe4n\n"))
  assert (
    run_cli(
      lambda: load_pairs(
        "multi30k", "train", "en", "de", tmp_path / "tfds", source_dir=tmp_path / "a"
      )
    )
    == 2
  )
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "train.en.gz line 1 is not UTF-8" in lines[0], lines


@pytest.mark.slow
def test_first_runs_preparing_at_once_all_succeed(tmp_path):
  """Three processes prepare one fresh folder together (two first runs of a new cache): they
  take turns, and none fails on tfds's rename of the folder another one finished."""
  code = (
    "import sys; from transformer.data.multi30k import prepare_multi30k; "
    "print(len(prepare_multi30k(sys.argv[1]).as_data_source(split='validation')))"
  )
  processes = [
    subprocess.Popen(
      [sys.executable, "-c", code, str(tmp_path / "tfds")],
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(3)
  ]
  for process in processes:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == str(SPLIT_SIZES["validation"])


def test_a_damaged_dataset_info_is_named_with_the_fix(tmp_path):
  """dataset_info.json of the prepared copy cut short: a protobuf ParseError traceback before."""
  import shutil

  from transformer.errors import UserError

  builder = prepare_multi30k(tmp_path / "tfds")
  (info,) = Path(builder.data_dir).glob("dataset_info.json")
  info.write_text(info.read_text(encoding="utf-8")[:100], encoding="utf-8")
  with pytest.raises(UserError, match=r"the prepared Multi30k in .* is damaged .*delete that"):
    prepare_multi30k(tmp_path / "tfds")
  shutil.rmtree(tmp_path / "tfds" / "multi30k_sources")  # the fix it names
  assert len(prepare_multi30k(tmp_path / "tfds").as_data_source(split="validation")) == 1014
