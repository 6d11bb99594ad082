"""The Multi30k builder against the raw gzip files it is made from."""

import gzip
import os
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from transformer.data import multi30k
from transformer.data.multi30k import (DEFAULT_SOURCE_DIR, SPLIT_FILES, SPLIT_SIZES, Multi30k,
                                       load_pairs, prepare_multi30k)


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
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"de": tfds.features.Text(), "en": tfds.features.Text()}), disable_shuffling=True)

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
  pairs = load_pairs("multi30k", "test_2017", "en", "de", tmp_path / "tfds",
                     source_dir=tmp_path / "src")
  assert pairs == [(f"en test_2017_flickr line {i}", f"de test_2017_flickr line {i}")
                   for i in range(2)]


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
