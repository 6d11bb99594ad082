"""Your own files as a corpus (dataset text and parallel): each layout against the text it holds,
hold-out splits, the one-line errors, running-text batches resumed and split over processes."""

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest

from transformer.config import Config, get_config
from transformer.data.config import DataConfig
from transformer.data.corpus import Corpus, Location
from transformer.data.files import FileCorpus
from transformer.data.inputs import Share, running_eval_batches, training_inputs
from transformer.data.multi30k import DEFAULT_SOURCE_DIR
from transformer.data.pipeline import running_ids, running_windows
from transformer.data.stream import running_text_stream
from transformer.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, write_char_vocab
from transformer.errors import MissingFile, UserError


def write(path: Path, text: str, *, gz: bool = False) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  data = text.encode("utf-8")
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def text_corpus(files, **changes) -> FileCorpus:
  return FileCorpus.of(DataConfig(dataset="text", train_files=tuple(map(str, files)), **changes))


def joined(corpus: FileCorpus, split: str) -> str:
  """The split's records as text, a document end shown as "|"."""
  return "".join(text or "|" for _, text in corpus.records(split))


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


def test_text_files_are_documents_of_lines_gzip_or_not_in_glob_order(tmp_path):
  write(tmp_path / "b.txt.gz", "second doc\nends here", gz=True)
  write(tmp_path / "a.txt", "First line\n\nthird line\n")
  corpus = text_corpus([tmp_path / "*.txt*"], eval_files=(str(tmp_path / "a.txt"),))
  assert joined(corpus, "train") == "First line\n\nthird line\n|second doc\nends here|"
  records = [text for _, text in corpus.records("train")]
  assert records[:3] == ["First line\n", "\n", "third line\n"]  # one record a line
  assert joined(corpus, "validation") == "First line\n\nthird line\n|"


def test_held_out_validation_is_the_last_characters_as_nanogpt_cuts_them(tmp_path):
  text = "".join(chr(c) for c in range(0x20, 0x7F)) * 7 + "\nend\n"
  write(tmp_path / "one.txt", text)
  write(tmp_path / "two.txt", "more\ntext\n")
  corpus = text_corpus([tmp_path / "one.txt", tmp_path / "two.txt"], validation_fraction=0.25)
  whole = text + "more\ntext\n"
  cut = int(len(whole) * 0.75)
  # The training part ends mid-document (no end marker); validation ends both documents.
  assert joined(corpus, "train") == whole[:cut]
  assert joined(corpus, "validation") == whole[cut:].replace("\nend\n", "\nend\n|") + "|"
  assert corpus.fingerprint("train") != corpus.fingerprint("validation")


def test_a_line_longer_than_a_piece_is_cut_into_records(tmp_path, monkeypatch):
  monkeypatch.setattr("transformer.data.files.PIECE_CHARS", 4)
  write(tmp_path / "t.txt", "abcdefghij\nxy")
  corpus = text_corpus([tmp_path / "t.txt"], eval_files=(str(tmp_path / "t.txt"),))
  assert [t for _, t in corpus.records("train")] == ["abcd", "efgh", "ij\n", "xy", ""]


def test_running_ids_of_char_records_reproduce_the_text(tmp_path):
  text = "Zwei Männer\n\tsprechen — 🙂\nüber π.\n"
  write(tmp_path / "x.txt", text)
  corpus = text_corpus([tmp_path / "x.txt"], eval_files=(str(tmp_path / "x.txt"),))
  tokenizer = Tokenizer(write_char_vocab(tmp_path / "vocab.json", text))
  records = [t for _, t in corpus.records("train")]
  ids = running_ids(tokenizer.encode(records), line_breaks_are_text=True)
  assert ids[-1] == EOS_ID and tokenizer.decode(ids[None, :-1]) == [text]
  # SentencePiece drops line breaks: EOS follows every line instead.
  sp_ids = running_ids([[7], [8, 9], []], line_breaks_are_text=False)
  np.testing.assert_array_equal(sp_ids, [7, EOS_ID, 8, 9, EOS_ID, EOS_ID])


@pytest.mark.parametrize("gz", [False, True])
def test_parallel_files_by_language_and_tsv(tmp_path, gz):
  suffix = ".gz" if gz else ""
  write(tmp_path / f"train.en{suffix}", "a dog\ntwo men\n", gz=gz)
  write(tmp_path / f"train.de{suffix}", "ein Hund\nzwei Männer\n", gz=gz)
  write(tmp_path / "dev.tsv", "a cat\teine Katze\nthe sun\tdie Sonne\n")
  data = DataConfig(
    dataset="parallel",
    train_files=(str(tmp_path / f"train.{{lang}}{suffix}"),),
    eval_files=(str(tmp_path / "dev.tsv"),),
    test_files=(str(tmp_path / "dev.tsv"),),
  )
  corpus = FileCorpus.of(data)
  assert corpus.pairs("train") == [("a dog", "ein Hund"), ("two men", "zwei Männer")]
  assert corpus.pairs("validation") == [("a cat", "eine Katze"), ("the sun", "die Sonne")]
  assert corpus.pairs("dev") == corpus.pairs("validation")  # a test set named by its file


def test_parallel_hold_out_takes_the_last_pairs(tmp_path):
  pairs = [(f"s{i}", f"t{i}") for i in range(10)]
  write(tmp_path / "all.tsv", "".join(f"{s}\t{t}\n" for s, t in pairs))
  data = DataConfig(
    dataset="parallel", train_files=(str(tmp_path / "all.tsv"),), validation_fraction=0.2
  )
  corpus = FileCorpus.of(data)
  assert corpus.pairs("train") == pairs[:8] and corpus.pairs("validation") == pairs[8:]


def test_multi30k_files_read_as_parallel_files_give_the_same_pairs_in_order(tmp_path):
  """The argument for equal BLEU: the same pairs in the same order as the shipped loader."""
  shipped = Corpus.of(DataConfig(), tmp_path / "cache")
  files = FileCorpus.of(
    DataConfig(
      dataset="parallel",
      train_files=(str(DEFAULT_SOURCE_DIR / "train.{lang}.gz"),),
      eval_files=(str(DEFAULT_SOURCE_DIR / "val.{lang}.gz"),),
      test_files=(str(DEFAULT_SOURCE_DIR / "test_2016_flickr.{lang}.gz"),),
    )
  )
  assert files.pairs("validation") == shipped.pairs("validation")
  assert files.pairs("test_2016_flickr") == shipped.pairs("test_2016")
  assert files.pairs("train")[:3000:7] == shipped.pairs("train")[:3000:7]


# ------------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the fix
# ------------------------------------------------------------------------------------------------


def test_missing_files_and_empty_globs(tmp_path):
  with pytest.raises(MissingFile, match=r"data.train_files: .*nope.txt does not exist"):
    text_corpus([tmp_path / "nope.txt"]).pairs("train")
  with pytest.raises(MissingFile, match=r"no file matches .*\*.md"):
    text_corpus([tmp_path / "*.md"]).pairs("train")
  with pytest.raises(MissingFile, match=r"data.train_files: .* is a folder: name its files, or"):
    text_corpus([tmp_path]).pairs("train")


def test_an_empty_file_is_named(tmp_path):
  write(tmp_path / "empty.txt", "")
  with pytest.raises(UserError, match=r"empty.txt is empty: give it text"):
    text_corpus([tmp_path / "empty.txt"]).pairs("train")


def test_misaligned_parallel_sides_name_both_counts(tmp_path):
  write(tmp_path / "t.en", "a\nb\nc\n")
  write(tmp_path / "t.de", "x\ny\n")
  data = DataConfig(dataset="parallel", train_files=(str(tmp_path / "t.{lang}"),))
  with pytest.raises(UserError, match=r"t.en has 3 lines but .*t.de has 2"):
    FileCorpus.of(data).pairs("train")


@pytest.mark.parametrize("gz", [False, True])
def test_bytes_that_are_not_utf8_name_the_line(tmp_path, gz):
  raw = b"fine\nalso fine\n" + b"bad \xff byte\n"
  (tmp_path / "t.txt").write_bytes(gzip.compress(raw) if gz else raw)
  with pytest.raises(UserError, match=r"t.txt line 3 is not UTF-8 \(byte 0xff at byte 5"):
    text_corpus([tmp_path / "t.txt"]).pairs("train")


def test_a_tsv_line_without_one_tab(tmp_path):
  write(tmp_path / "p.tsv", "a\tb\nno tab here\n")
  data = DataConfig(dataset="parallel", train_files=(str(tmp_path / "p.tsv"),))
  with pytest.raises(UserError, match=r"p.tsv line 2 has 0 tabs"):
    FileCorpus.of(data).pairs("train")


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(dataset="text"), "reads data.train_files, which is empty"),
    (dict(train_files=("a.txt",)), "read only with data.dataset=text or parallel"),
    (dict(dataset="parallel", train_files=("a.txt",)), r"write the language as \{lang\}"),
    (dict(dataset="text", train_files=("a",), validation_fraction=0.0), "no validation text"),
    (dict(vocab_size=0), "is for tokenizer_type char or byte"),
    (dict(tokenizer_type="byte", vocab_size=300), "a byte vocabulary has 261 ids"),
  ],
)
def test_data_block_errors_say_what_to_set(changes, message):
  with pytest.raises(UserError, match=message):
    DataConfig(**changes)


# ------------------------------------------------------------------------------------------------
# Running text: windows, resume, processes
# ------------------------------------------------------------------------------------------------


def test_running_windows_make_every_id_after_the_first_a_target_once():
  ids = np.arange(100, 123, dtype=np.int32)
  windows = running_windows(ids, 5)
  assert windows.shape == (5, 6)
  targets = windows[:, 1:].ravel()
  np.testing.assert_array_equal(targets[targets != PAD_ID], ids[1:])
  np.testing.assert_array_equal(windows[:, :-1].ravel()[:22], ids[:-1])  # each reads its left


def batches(stream, n):
  return [next(stream) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("mlm", [None, (40, 0.3)])
def test_running_text_stream_resumes_mid_epoch_exactly(mlm):
  ids = np.random.default_rng(0).integers(5, 40, 3000).astype(np.int32)
  make = lambda: running_text_stream(ids, 16, 8, seed=3, mlm=mlm, prefetch=2)
  whole = batches(make(), 60)  # 23 batches an epoch: this crosses two epoch ends
  first = make()
  head = batches(first, 17)
  state = first.state()
  first.close()
  resumed = make()
  resumed.restore(state)
  assert_same(head + batches(resumed, 43), whole)


def test_language_model_windows_read_the_preceding_ids_and_move_each_epoch():
  ids = np.arange(5, 5 + 400, dtype=np.int32)  # id = 5 + position: windows show their offsets
  stream = running_text_stream(ids, 10, 4, seed=0, prefetch=0)
  per_epoch = (400 - 11 - 9) // 10 + 1
  seen = [next(stream) for _ in range(2 * -(-per_epoch // 4))]
  for batch in seen:
    real = batch["targets"][:, 0] != PAD_ID
    np.testing.assert_array_equal(batch["targets"][real], batch["inputs"][real] + 1)
  starts = lambda batch_list: {
    int(x) % 10 for b in batch_list for x in b["inputs"][:, 0] if x != PAD_ID
  }
  assert starts(seen[: per_epoch // 4]) == {5}  # epoch 0 starts at 0
  assert len(starts(seen[-(per_epoch // 4) :])) == 1


@pytest.mark.parametrize("mlm", [None, (40, 0.3)])
def test_two_processes_read_exactly_the_single_process_batches(mlm):
  ids = np.random.default_rng(1).integers(5, 40, 2000).astype(np.int32)
  one = batches(running_text_stream(ids, 16, 8, seed=5, mlm=mlm, prefetch=0), 20)
  halves = [
    batches(running_text_stream(ids, 16, 8, seed=5, mlm=mlm, share=Share(i, 2), prefetch=0), 20)
    for i in range(2)
  ]
  joined_ = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves, strict=True)]
  assert_same(joined_, one)
  for shifted in (True, False):
    whole = running_eval_batches(ids, 16, 8, shifted=shifted)
    parts = [running_eval_batches(ids, 16, 8, shifted=shifted, share=Share(i, 2)) for i in (0, 1)]
    merged = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts, strict=True)]
    assert_same(merged, whole)


def test_validation_windows_cover_the_text_once_or_a_spread_subset():
  ids = np.arange(5, 5 + 1000, dtype=np.int32)
  batches_ = running_eval_batches(ids, 16, 8, shifted=True)
  targets = np.concatenate([b["targets"] for b in batches_]).ravel()
  np.testing.assert_array_equal(targets[targets != PAD_ID], ids[1:])
  few = running_eval_batches(ids, 16, 8, shifted=True, limit=5)
  starts = [int(x) for x in few[0]["inputs"][:5, 0]]
  assert starts[0] == 5 and starts[-1] > 900 and len(few) == 1


# ------------------------------------------------------------------------------------------------
# Through training_inputs: tokenizer kinds, vocabulary size 0
# ------------------------------------------------------------------------------------------------


def text_config(tmp_path, task: str, tokenizer_type: str, vocab_size: int):
  text = "".join(f"line {i}: to be or not to be, ünd 🙂\n" for i in range(300))
  write(tmp_path / "corpus.txt", text)
  config = get_config()
  config.task = task
  config.data.update(
    dataset="text",
    train_files=(str(tmp_path / "corpus.txt"),),
    tokenizer_type=tokenizer_type,
    vocab_size=vocab_size,
    max_len=16,
    tokens_per_batch=16 * 8,
    eval_batch_size=8,
    cache_dir=str(tmp_path / "cache"),
  )
  return Config.of(config), text


@pytest.mark.parametrize(
  "task, kind, size", [("lm", "char", 0), ("mlm", "byte", 261), ("lm", "bpe", 80)]
)
def test_text_inputs_for_each_vocabulary(tmp_path, task, kind, size):
  config, text = text_config(tmp_path, task, kind, size)
  where = Location.of(config.data, tmp_path / "run")
  if size == 0:  # what setup.opened does: the tokenizer's own size, once it exists
    from transformer.train.setup import _tokenizer_size

    config = config.with_vocab_size(_tokenizer_size(config, where))
    assert config.model.vocab_size == 5 + len(set(text))
  inputs = training_inputs(config.data, where, task=task, seed=0, prefetch=0)
  batch = next(inputs.train)
  assert batch["targets"].shape == (8, 16) and batch["inputs"].shape == (8, 16)
  assert inputs.tokenizer.kind == ("sentencepiece" if kind == "bpe" else kind)
  if task == "lm" and kind != "bpe":  # characters end to end: inputs and targets are the text
    row = (
      inputs.tokenizer.decode(batch["inputs"][:1])[0]
      + inputs.tokenizer.decode(batch["targets"][:1, -1:])[0]
    )
    assert row in text
  assert inputs.eval_batches and not inputs.test_sets
  inputs.train.close()


def test_a_char_vocabulary_of_another_size_names_the_size(tmp_path):
  config, text = text_config(tmp_path, "lm", "char", 40)
  where = Location.of(config.data, tmp_path / "run")
  with pytest.raises(UserError, match=rf"set data.vocab_size={5 + len(set(text))}"):
    training_inputs(config.data, where, task="lm", seed=0, prefetch=0)


def test_equal_characters_reuse_the_token_cache(tmp_path):
  write(tmp_path / "a" / "x.txt", "same text\n" * 50)
  write(tmp_path / "b" / "x.txt", "same text\n" * 50)
  prints = [
    text_corpus([tmp_path / d / "x.txt"]).fingerprint("train") for d in ("a", "b")
  ]  # contents and names, not folders
  assert prints[0] == prints[1]
  write(tmp_path / "b" / "x.txt", "other text\n" * 50)
  assert text_corpus([tmp_path / "b" / "x.txt"]).fingerprint("train") != prints[0]


def test_itertools_product_of_layouts_all_read(tmp_path):
  """Every file layout x compression reads the same pairs."""
  pairs = [("a b", "c d"), ("e", "f g h")]
  for gz, layout in itertools.product((False, True), ("lang", "tsv")):
    folder = tmp_path / f"{gz}{layout}"
    suffix = ".gz" if gz else ""
    if layout == "tsv":
      write(folder / f"p.tsv{suffix}", "".join(f"{s}\t{t}\n" for s, t in pairs), gz=gz)
      entry = folder / f"p.tsv{suffix}"
    else:
      write(folder / f"p.en{suffix}", "".join(s + "\n" for s, _ in pairs), gz=gz)
      write(folder / f"p.de{suffix}", "".join(t + "\n" for _, t in pairs), gz=gz)
      entry = folder / f"p.{{lang}}{suffix}"
    data = DataConfig(dataset="parallel", train_files=(str(entry),), validation_fraction=0.5)
    corpus = FileCorpus.of(data)
    assert corpus.pairs("train") + corpus.pairs("validation") == pairs


def test_translation_from_files_scores_the_test_files_whatever_test_splits_names(tmp_path):
  """The recipe's test_splits name Multi30k's sets; a run on files scores data.test_files, named
  after them (the run read test_2016 and refused to start)."""
  words = ["a dog", "two men", "the sun", "a cat", "one tree", "red car", "big house"]
  for lang in ("en", "de"):  # both sides alike: the test is about which sets are read
    write(tmp_path / f"all.{lang}", "".join(f"{w} {i}\n" for i in range(40) for w in words))
    write(tmp_path / f"news.{lang}", "a dog 1\nthe sun 2\n")
  config = get_config()
  config.data.update(
    dataset="parallel",
    train_files=(str(tmp_path / "all.{lang}"),),
    test_files=(str(tmp_path / "news.{lang}"),),
    vocab_size=36,
    max_len=16,
    tokens_per_batch=16 * 8,
    eval_batch_size=8,
    cache_dir=str(tmp_path / "cache"),
  )
  typed = Config.of(config)
  assert typed.data.test_splits == ("test_2016", "test_2017")
  inputs = training_inputs(
    typed.data, Location.of(typed.data, tmp_path / "run"), task="translation", seed=0, prefetch=0
  )
  assert [test.name for test in inputs.test_sets] == ["news"]
  assert [target for _, target in inputs.test_sets[0].pairs] == ["a dog 1", "the sun 2"]
  inputs.train.close()
