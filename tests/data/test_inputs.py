"""What a run reads, built from the config: multi-process batches and vocabulary-size errors."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from transformer.cli import run_cli
from transformer.config import Config, get_config
from transformer.data.config import DataConfig
from transformer.data.corpus import Location
from transformer.data.inputs import Share, train_tokenizer, training_inputs
from transformer.data.tokenizer import MASK_ID, MODEL_FILENAME, Tokenizer

ENGLISH = [
  "a man rides a bike",
  "two dogs play in the snow",
  "a cat sleeps on a red sofa",
  "children run across the green field",
  "an old woman reads a book",
]
GERMAN = [
  "ein Mann fährt Rad",
  "zwei Hunde spielen im Schnee",
  "eine Katze schläft auf einem Sofa",
  "Kinder laufen über die grüne Wiese",
  "eine alte Frau liest ein Buch",
]


def write_corpus(directory: Path, repeat: int) -> None:
  directory.mkdir()
  for stem in ("train", "val", "test_2016_flickr", "test_2017_flickr"):
    for lang, lines in (("en", ENGLISH), ("de", GERMAN)):
      with gzip.open(directory / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines * repeat) + "\n")


def inputs_of(config, workdir: Path, **kwargs):
  typed = Config.of(config)
  where = Location.of(typed.data, workdir)
  return training_inputs(typed.data, where, task=typed.task, seed=typed.seed, **kwargs)


def mlm_config(corpus: Path):
  config = get_config()
  config.task = "mlm"
  config.data.update(
    source_dir=str(corpus),
    train_split="train",
    eval_split="validation",
    test_splits=(),
    vocab_size=60,
    max_len=16,
    length_buckets=(16,),
    tokens_per_batch=16 * 8,
    eval_batch_size=8,
  )
  return config


def test_mlm_batches_over_two_processes_are_the_single_process_batches(tmp_path):
  write_corpus(tmp_path / "corpus", repeat=8)
  config = mlm_config(tmp_path / "corpus")
  workdir = tmp_path / "run"  # One workdir: the tokenizer trained once is shared by all three.
  single = inputs_of(config, workdir, batch_multiple=2)
  shards = [inputs_of(config, workdir, batch_multiple=2, share=Share(p, 2)) for p in range(2)]
  for _ in range(3):
    whole = next(single.train)
    halves = [next(shard.train) for shard in shards]
    assert whole["weights"].sum() > 0 and halves[0]["inputs"].shape[0] == 4
    for key in ("inputs", "targets", "weights"):
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
  assert len(single.eval_batches) > 1
  for i, whole in enumerate(single.eval_batches):
    for key in ("inputs", "targets", "weights"):
      np.testing.assert_array_equal(
        np.concatenate([shard.eval_batches[i][key] for shard in shards]), whole[key]
      )


# The two training sentences hold 16 distinct characters (a m n r i d e s b k M f ä h t R);
# SentencePiece adds ▁ for the space, and there are 5 special pieces: at least 22 in all.
PAIRS = [("a man rides a bike", "ein Mann fährt Rad")] * 20
MINIMUM = 16 + 1 + MASK_ID + 1


def vocab_config(vocab_size: int) -> DataConfig:
  return DataConfig(vocab_size=vocab_size)


def sentences(pairs):
  return [s for pair in pairs for s in pair]


def load_tokenizer(data: DataConfig, directory: Path):
  train_tokenizer(data, directory, sentences(PAIRS))
  return Tokenizer(directory / MODEL_FILENAME)


def cli_error(capsys, main) -> str:
  assert run_cli(main) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def test_vocab_size_below_the_characters_names_the_minimum(tmp_path, capsys):
  line = cli_error(
    capsys, lambda: train_tokenizer(vocab_config(MINIMUM - 2), tmp_path, sentences(PAIRS))
  )
  assert f"data.vocab_size={MINIMUM - 2}" in line and f"at least {MINIMUM})" in line
  assert "raise data.vocab_size" in line
  # The minimum it names is one that trains.
  assert load_tokenizer(vocab_config(MINIMUM), tmp_path).vocab_size == MINIMUM


@pytest.mark.parametrize("vocab_size", [0, MASK_ID])
def test_vocab_size_below_the_special_pieces(vocab_size, tmp_path, capsys):
  line = cli_error(
    capsys, lambda: train_tokenizer(vocab_config(vocab_size), tmp_path, sentences(PAIRS))
  )
  assert f"data.vocab_size={vocab_size}" in line and f"the {MASK_ID + 1} special pieces" in line
  assert "raise data.vocab_size" in line


def test_a_split_is_encoded_with_the_tokenizer_of_the_model_that_is_scored(tmp_path):
  """Another run's export copied into a workdir brings its own tokenizer: `evaluate --split`
  reads the split's token cache of that tokenizer, not of the workdir's spm.model (which
  scored the export on ids it never learned, e.g. BLEU 1.39 instead of 2.05)."""
  from transformer.data.inputs import evaluation_sets

  write_corpus(tmp_path / "corpus", repeat=8)
  config = mlm_config(tmp_path / "corpus")
  config.task = "translation"
  config.data.update(
    test_splits=("test_2016",),
    vocab_size=40,
    max_len=48,
    length_buckets=(48,),
    tokens_per_batch=384,
  )
  typed = Config.of(config)
  where = Location.of(typed.data, tmp_path / "run")
  inputs_of(config, tmp_path / "run")  # the run's own tokenizer and caches
  own = Tokenizer(tmp_path / "run" / MODEL_FILENAME)
  other = load_tokenizer(vocab_config(MINIMUM), tmp_path / "other")
  (test_set,) = evaluation_sets(typed.data, where, ["test_2016"], tokenizer=other)
  sources = [source for source, _ in test_set.pairs]
  assert other.encode(sources) != own.encode(sources)
  assert [ids[:-1].tolist() for ids in test_set.examples.inputs] == other.encode(sources)


def test_a_damaged_tokenizer_in_the_cache_is_named_and_never_copied(tmp_path):
  """The cache's copy of a tokenizer is garbage: the error names that file (not the workdir's
  spm.model, whose deletion only copied the garbage back), and deleting it trains a new one."""
  from transformer.data.corpus import Corpus
  from transformer.data.inputs import ensure_tokenizer
  from transformer.errors import UserError

  write_corpus(tmp_path / "corpus", repeat=8)
  data = DataConfig(source_dir=str(tmp_path / "corpus"), train_split="train", vocab_size=40)
  corpus, cache = Corpus.of(data, tmp_path / "cache"), tmp_path / "cache"
  ensure_tokenizer(data, corpus, tmp_path / "first", cache)
  (cached,) = (cache / "tokenizers").glob(f"*/{MODEL_FILENAME}")
  cached.write_bytes(b"garbage")
  with pytest.raises(UserError, match=f"{cached} is not a SentencePiece model"):
    ensure_tokenizer(data, corpus, tmp_path / "second", cache)
  assert not (tmp_path / "second" / MODEL_FILENAME).exists()
  cached.unlink()  # the fix the message names
  path = ensure_tokenizer(data, corpus, tmp_path / "second", cache)
  assert path.read_bytes() == (tmp_path / "first" / MODEL_FILENAME).read_bytes()


@pytest.mark.parametrize(
  "split, message",
  [
    ("train[:0]", "split 'train[:0]' cannot be read (the slice selects no pairs)"),
    ("train[5:5]", "split 'train[5:5]' cannot be read (the slice selects no pairs)"),
    ("tran", "split 'tran' cannot be read (Unknown split 'tran'"),
    ("train[:abc]", "split 'train[:abc]' cannot be read (Error parsing split"),
  ],
)
def test_a_split_that_selects_nothing_is_named(split, message, tmp_path):
  """`train_split=train[:0]` said "Paths sequence can not be of 0 length"."""
  from transformer.data.corpus import Corpus
  from transformer.errors import UserError

  write_corpus(tmp_path / "corpus", repeat=2)
  corpus = Corpus.of(DataConfig(source_dir=str(tmp_path / "corpus")), tmp_path / "cache")
  with pytest.raises(UserError, match=re.escape(message)):
    list(corpus.chunks(split))


@pytest.mark.parametrize("damage", ["cut", "delete"])
def test_prepared_files_cut_short_are_named_with_the_fix(damage, tmp_path):
  """The token caches removed and the prepared tfds files cut in half or deleted: reading the
  split again is one line naming the folder to delete (it was a RuntimeError from ArrayRecord).
  Read in a fresh interpreter: the tests' type-checking hook would read a record itself first."""
  import shutil
  import subprocess
  import sys

  from transformer.data.corpus import Corpus

  write_corpus(tmp_path / "corpus", repeat=400)
  corpus = Corpus.of(DataConfig(source_dir=str(tmp_path / "corpus")), tmp_path / "cache")
  assert sum(len(chunk) for chunk in corpus.chunks("train")) == 2000
  for path in (tmp_path / "cache" / "tfds").rglob("*train.array_record*"):
    if damage == "cut":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
      path.unlink()
  code = (
    "import sys; from pathlib import Path; from transformer.cli import run_cli; "
    "from transformer.data.config import DataConfig; from transformer.data.corpus import Corpus; "
    "corpus = Corpus.of(DataConfig(source_dir=sys.argv[1]), Path(sys.argv[2])); "
    "sys.exit(run_cli(lambda: list(corpus.chunks('train'))))"
  )
  result = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path / "corpus"), str(tmp_path / "cache")],
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert re.search(r"the prepared files under .* cannot be read .*: delete", lines[0]), lines
  shutil.rmtree(tmp_path / "cache" / "tfds" / "multi30k_sources")  # the fix it names
  assert sum(len(chunk) for chunk in corpus.chunks("train")) == 2000
