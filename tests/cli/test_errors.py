"""Bad input gets one line naming the problem and the fix, a non-zero exit, no traceback."""

import gzip
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.cli import run_cli
from transformer.configs import smoke
from transformer.train.loop import run

ROOT = Path(__file__).resolve().parents[2]


def cli_error(capsys, main) -> str:
  """Runs `main` as the CLIs do; returns the single stderr line after checking the exit code."""
  assert run_cli(main) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(model=dict(d_model=30, num_heads=4)), "d_model=30 is not divisible by model.num_heads"),
    (dict(model=dict(d_ff=0)), "model.d_ff must be positive"),
    (dict(num_train_steps=0), "num_train_steps must be positive"),
    (dict(model=dict(attention="flash")), "attention='flash' is unknown"),
    (dict(parallel=dict(fsdp=3)), "does not divide the 8 devices"),
    (dict(parallel=dict(tensor=8, data=1)), "num_heads=2 is not divisible by the tensor axis"),
    (dict(data=dict(dataset="no_such_dataset")), "not a tensorflow-datasets name"),
    (dict(data=dict(max_len=128, length_buckets=(128,))), "exceeds model.max_len"),
    (dict(data=dict(length_buckets=(16,))), "length_buckets=(16,) end below data.max_len=32"),
    (dict(task="seq2seq"), "task='seq2seq' is unknown"),
    (dict(optimizer=dict(warmup_steps=0)), "optimizer.warmup_steps must be >= 1"),
    (dict(optimizer=dict(warmup_steps=-5)), "optimizer.warmup_steps must be >= 1"),
    (dict(label_smoothing=1.0), "label_smoothing must be in [0, 1)"),
    (dict(label_smoothing=-0.1), "label_smoothing must be in [0, 1)"),
    (dict(optimizer=dict(b1=1.0)), "optimizer.b1 must be in [0, 1)"),
    (dict(optimizer=dict(b2=-0.5)), "optimizer.b2 must be in [0, 1)"),
    (dict(optimizer=dict(eps=0.0)), "optimizer.eps must be a finite number > 0"),
    (dict(optimizer=dict(schedule="linear")), "optimizer.schedule='linear' is unknown"),
    (
      dict(average_last_checkpoints=6),
      "average_last_checkpoints=6 must be in [0, keep_checkpoints=5]",
    ),
    (dict(decode=dict(beam_size=0)), "decode.beam_size must be >= 1"),
    (dict(decode=dict(alpha=-1.0)), "decode.alpha (length penalty) must be a finite number >= 0"),
    (dict(decode=dict(max_extra_tokens=-1)), "decode.max_extra_tokens must be >= 0"),
    (dict(decode=dict(stop="fast")), "decode.stop must be one of heuristic, exact, got 'fast'"),
    (dict(data=dict(vocab_size=3)), "data.vocab_size=3 leaves no room for text"),
    (dict(data=dict(tokenizer_type="wordpiece")), "data.tokenizer_type='wordpiece' is unknown"),
    (
      dict(data=dict(eval_batch_size=12)),
      "data.eval_batch_size=12 does not split over data x fsdp = 8",
    ),
    (
      dict(model=dict(d_model=36), parallel=dict(fsdp=-1, data=1)),
      "d_model=36 is not divisible by the fsdp axis",
    ),
    # Finite and in range, or the run trains nothing (eps=inf: every update is zero) or dies
    # later with advice that does not fit (weight_decay=inf: "lower the learning rate").
    (dict(optimizer=dict(eps=float("inf"))), "optimizer.eps must be a finite number > 0"),
    (
      dict(optimizer=dict(name="adamw", weight_decay=float("inf"))),
      "optimizer.weight_decay must be a finite number >= 0",
    ),
    (dict(optimizer=dict(lr_scale=float("nan"))), "optimizer.lr_scale must be a finite number"),
    (
      dict(optimizer=dict(schedule="cosine", peak_learning_rate=float("inf"))),
      "optimizer.peak_learning_rate must be a finite number > 0",
    ),
    (
      dict(optimizer=dict(grad_clip_norm=float("inf"))),
      "optimizer.grad_clip_norm must be a finite number >= 0",
    ),
    (dict(model=dict(layer_norm_epsilon=float("nan"))), "model.layer_norm_epsilon must be a"),
    (dict(model=dict(layer_norm_epsilon=-1.0)), "model.layer_norm_epsilon must be a finite"),
    (dict(model=dict(layer_norm_epsilon=0.0)), "model.layer_norm_epsilon must be a finite"),
    (dict(model=dict(dropout_rate=float("nan"))), "model.dropout_rate must be in [0, 1)"),
    (dict(label_smoothing=float("nan")), "label_smoothing must be in [0, 1)"),
    (dict(model=dict(num_classes=0)), "model.num_classes must be positive"),
    (dict(model=dict(pad_id=5)), "model.pad_id=5: the tokenizer pads with id 0"),
    (dict(model=dict(pad_id=-1)), "model.pad_id=-1 is not an id"),
    (dict(seed=2**64), "seed=18446744073709551616 is too large"),
    (dict(parallel=dict(barrier_timeout_s=float("inf"))), "barrier_timeout_s must be positive"),
    # Evaluation batches are padded to their full size: 8e8 rows allocated for minutes.
    (dict(data=dict(eval_batch_size=8 * 10**8)), "data.eval_batch_size=800000000 needs"),
  ],
)
def test_bad_config_values(change, message, tmp_path, capsys):
  """Each is refused before the tokenizer is trained (or, below, before the data is read)."""
  config = smoke.get_config()
  config.update(change)
  assert message in cli_error(capsys, lambda: run(config, tmp_path))
  assert not (tmp_path / "spm.model").exists()
  if "dataset" not in change:
    assert not (tmp_path / "tfds").exists()


def write_corpus(directory: Path, lines: dict[str, list[str]]) -> None:
  for split in ("train", "val", "test_2016_flickr", "test_2017_flickr"):
    for lang, text in lines.items():
      with gzip.open(directory / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")


def test_missing_data_file(tmp_path, capsys):
  config = smoke.get_config()
  config.data.source_dir = str(tmp_path / "nowhere")
  line = cli_error(capsys, lambda: run(config, tmp_path / "run"))
  assert "is missing" in line and "train.en.gz" in line


def test_misaligned_data_files(tmp_path, capsys):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_corpus(corpus, {"en": ["a man", "a dog", "a cat"], "de": ["ein Mann", "ein Hund"]})
  config = smoke.get_config()
  config.data.update(
    source_dir=str(corpus), train_split="train", eval_split="validation", test_splits=("test_2016",)
  )
  line = cli_error(capsys, lambda: run(config, tmp_path / "run"))
  assert "line counts differ" in line and "3 lines" in line and "2 lines" in line


def test_empty_long_and_unknown_lines_are_counted(tmp_path, caplog):
  from transformer.config import Config
  from transformer.data.corpus import Location
  from transformer.data.inputs import training_inputs

  corpus = tmp_path / "corpus"
  corpus.mkdir()
  english = ["a man rides a bike", "", "two dogs play in the snow", "word " * 60, "a cat sleeps"]
  german = [
    "ein Mann fährt Rad",
    "leer",
    "zwei Hunde spielen im Schnee",
    "Wort " * 60,
    "eine Katze schläft",
  ]
  write_corpus(corpus, {"en": english * 40, "de": german * 40})
  with gzip.open(corpus / "val.en.gz", "wt", encoding="utf-8") as f:  # a symbol never trained on
    f.write("\n".join(["a ☃ sleeps"] * 200) + "\n")
  config = smoke.get_config()
  config.data.update(
    source_dir=str(corpus),
    train_split="train",
    eval_split="validation",
    test_splits=(),
    vocab_size=40,
    max_len=32,
  )
  with caplog.at_level(logging.WARNING):
    data = Config.of(config).data
    training_inputs(data, Location.of(data, tmp_path / "run"), task="translation", seed=0)
  text = caplog.text
  assert "40 of 200 pairs have an empty side and were dropped" in text
  assert "40 dropped" in text  # the over-long pair, in training
  assert "truncated" in text  # evaluation keeps and truncates it
  assert "validation: 200 of" in text and "outside the vocabulary" in text  # the snowman


def test_vocabulary_too_large_for_the_text(tmp_path, capsys):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_corpus(corpus, {"en": ["a man", "a dog"] * 10, "de": ["ein Mann", "ein Hund"] * 10})
  config = smoke.get_config()
  config.data.update(
    source_dir=str(corpus),
    train_split="train",
    eval_split="validation",
    test_splits=(),
    vocab_size=500,
  )
  assert "lower data.vocab_size" in cli_error(capsys, lambda: run(config, tmp_path / "run"))


def test_translate_errors(tmp_path, capsys):
  from transformer.translate import main

  line = cli_error(capsys, lambda: main(["--workdir", str(tmp_path), "A man."]))
  assert "no exported model in" in line and "--step N" in line


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  config = smoke.get_config()
  config.decode.bleu_at_end = False
  run(config, workdir)
  return workdir


@pytest.mark.slow
def test_translate_passes_blank_text_through_and_cuts_long_text(trained_workdir, capsys, caplog):
  from transformer.translate import main

  assert run_cli(lambda: main(["--workdir", str(trained_workdir), "  "])) == 0
  assert capsys.readouterr().out == "\n"
  with caplog.at_level(logging.WARNING):
    assert run_cli(lambda: main(["--workdir", str(trained_workdir), "dog " * 100])) == 0
  assert "only the first 31 are translated" in caplog.text
  out = capsys.readouterr().out  # one line for the one input (the small model's may be empty)
  assert out.endswith("\n") and out.count("\n") == 1, out


@pytest.mark.slow
@pytest.mark.parametrize(
  "overrides,message",
  [
    (["--config.model.d_model=30", "--config.model.num_heads=4"], "error: model.d_model=30"),
    (["--config.model.d_modl=30"], "unknown config key model.d_modl, did you mean model.d_model?"),
    (
      ["--config", "configs/nothere.py"],
      "error: cannot load --config: [Errno 2] No such file or directory: 'configs/nothere.py'",
    ),
    (["--workdir", "/dev/null/x"], "error: /dev/null/x: Not a directory: check the path"),
    (["--config.optimizer.warmup_steps=0"], "error: optimizer.warmup_steps must be >= 1"),
  ],
)
def test_train_py_reports_errors_without_traceback(tmp_path, overrides, message):
  """The real entry point, in a subprocess: exit code 2 and one line, no traceback."""
  workdir = [] if "--workdir" in overrides else ["--workdir", str(tmp_path)]  # one a command
  result = subprocess.run(
    [sys.executable, "train.py", "--config", "smoke", *workdir, *overrides],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_resuming_with_another_model_names_the_config(trained_workdir):
  """A resumed run's model cannot change under it: the key is named before any checkpoint is
  read, and nothing is reported as corrupt."""
  result = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--config",
      "smoke",
      "--workdir",
      str(trained_workdir),
      "--config.model.d_ff=128",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line == (
    f"error: {trained_workdir} was trained with model.d_ff=64, this command sets 128: resuming "
    "would misread its checkpoints; use a new --workdir, or allow the change with "
    "--config.allow_config_change=model.d_ff"
  )


@pytest.mark.parametrize(
  "bug", ["{}['batch']", "__import__('numpy').ones(3) + __import__('numpy').ones(4)"]
)
def test_a_bug_exits_non_zero_with_its_traceback(bug):
  """An exception that is not a UserError (a missing batch key, a broadcasting error) is a bug
  of the package, not bad input: every command's wrapper lets its traceback through, exit 1."""
  code = f"import sys; from transformer.cli import run_cli; sys.exit(run_cli(lambda: {bug}))"
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1
  assert "Traceback (most recent call last)" in result.stderr
  assert "error: " not in result.stderr
  assert ("KeyError: 'batch'" in result.stderr) or (
    "ValueError: operands could not" in result.stderr
  )


def test_a_file_in_the_current_folder_never_shadows_a_shipped_recipe(tmp_path, monkeypatch):
  """`--config smoke` in a folder holding a file named `smoke` runs the shipped recipe, not the
  file (which an untrusted folder could hold); a file is given as a path."""
  from transformer.cli import recipe_path, recipes_dir

  monkeypatch.chdir(tmp_path)
  (tmp_path / "smoke").write_text("raise SystemExit('this file ran')\n", encoding="utf-8")
  (tmp_path / "smoke.py").write_text("raise SystemExit('this file ran')\n", encoding="utf-8")
  assert recipe_path("smoke") == str(recipes_dir() / "smoke.py")
  assert recipe_path("./smoke.py") == "./smoke.py"
  assert recipe_path(str(tmp_path / "smoke")) == str(tmp_path / "smoke")


@pytest.mark.parametrize(
  "data, message",
  [
    (dict(dataset="wmt14_translate/de-en"), "is not prepared in"),
    (dict(dataset="huggingface:some_dataset"), "names the community dataset"),
    (dict(cache_dir="/nonexistent/cache"), "names data.cache_dir='/nonexistent/cache', which does"),
    (dict(tfds_data_dir="/nonexistent/tfds"), "names data.tfds_data_dir='/nonexistent/tfds'"),
  ],
)
def test_evaluate_split_does_not_follow_a_data_block_off_this_machine(data, message, tmp_path):
  """A run folder from elsewhere: its config.json decides what `evaluate --split` reads. It may
  name the shipped corpus, local Multi30k files or a dataset prepared here; never a download,
  a preparation or a folder to create."""
  from transformer.data.config import DataConfig
  from transformer.data.corpus import Location
  from transformer.errors import UserError
  from transformer.evaluate import check_data_block

  block = DataConfig(**data)
  with pytest.raises(UserError, match=re.escape(message)):
    check_data_block(block, Location(tmp_path, tmp_path / "cache"), tmp_path / "config.json")
  assert not (tmp_path / "cache").exists() and not Path("/nonexistent").exists()
  check_data_block(DataConfig(), Location(tmp_path, tmp_path / "cache"), tmp_path / "config.json")
