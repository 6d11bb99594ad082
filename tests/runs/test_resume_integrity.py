"""A run is resumed or loaded only with what its checkpoints were made of: the same training
text (the stream position counts its batches), the same tokenizer file (the embeddings mean its
pieces), and step folders that hold their own step. Each refusal is one line naming the file or
folder and the fix; checkpoints written before the inputs were recorded still load."""

import gzip
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest

from tests.helpers import one_line_error, save_steps
from transformer import translate as translate_command
from transformer.configs import shakespeare_char, smoke
from transformer.data.multi30k import DEFAULT_SOURCE_DIR
from transformer.data.tokenizer import train_sentencepiece
from transformer.runs.checkpoint import Checkpointer, CheckpointError, Record, check_tokenizer
from transformer.train.loop import run

TEXT = "".join(
  f"ROMEO:\nShall I compare thee to a summer's day, number {i}?\n\n" for i in range(300)
)


def text_config(text_file: Path, steps: int, **changes):
  """A tiny char-level LM on `text_file`, a checkpoint every 3 steps, all of them kept."""
  config = shakespeare_char.get_config()
  config.model.update(d_model=32, num_heads=2, d_ff=64, num_decoder_layers=1, max_len=32)
  config.data.update(
    train_files=(str(text_file),), max_len=32, tokens_per_batch=8 * 32, eval_windows=16
  )
  config.update(
    num_train_steps=steps, eval_every_steps=100, checkpoint_every_steps=3, keep_checkpoints=5
  )
  config.update(changes)
  return config


def translate(workdir: Path, *args: str):
  return lambda: translate_command.main(["--workdir", str(workdir), *args, "Shall I"])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> tuple[Path, Path]:
  """(workdir, its text file): checkpoints 3 and 6."""
  folder = tmp_path_factory.mktemp("text_run")
  text_file = folder / "sonnets.txt"
  text_file.write_text(TEXT, encoding="utf-8")
  run(text_config(text_file, 6), folder / "run")
  return folder / "run", text_file


@pytest.fixture
def copy_of(text_run, tmp_path) -> Path:
  destination = tmp_path / "run"
  shutil.copytree(text_run[0], destination)
  return destination


# ------------------------------------------------------------------------------------------------
# The record itself (fast)
# ------------------------------------------------------------------------------------------------


def saved_and_restored(directory: Path, inputs: dict[str, str] | None) -> Record:
  checkpointer = Checkpointer(directory, asynchronous=False, inputs=inputs)
  try:
    checkpointer.save(1, {"w": jnp.ones(4)}, Record({"epoch": 0, "chunk": 0, "batch": 1}))
    return checkpointer.restore({"w": jnp.zeros(4)})[1]
  finally:
    checkpointer.close()


def test_a_checkpoint_records_its_inputs_and_older_ones_pass_unchecked(tmp_path):
  tokenizer = tmp_path / "vocab.json"
  tokenizer.write_text('{"kind": "char", "chars": ["a", "b"]}')
  recorded = {"tokenizer": "0" * 64, "train_text": "abc"}
  record = saved_and_restored(tmp_path / "new", recorded)
  assert record.inputs == recorded
  with pytest.raises(ValueError, match="is not the tokenizer checkpoint step 1 was trained with"):
    check_tokenizer(record, 1, tokenizer)
  older = saved_and_restored(tmp_path / "older", None)  # as written before inputs were recorded
  assert older.inputs is None and "inputs" not in older.to_json()
  check_tokenizer(older, 1, tokenizer)


# ------------------------------------------------------------------------------------------------
# Case 1: the training text changed under the same file names
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resuming_on_changed_training_text_is_refused_unless_allowed(tmp_path, capsys, caplog):
  text_file = tmp_path / "text.txt"
  text_file.write_text(TEXT, encoding="utf-8")
  run(text_config(text_file, 3), tmp_path / "run")
  text_file.write_text(TEXT[: len(TEXT) // 3], encoding="utf-8")  # same name, other text
  line = one_line_error(capsys, lambda: run(text_config(text_file, 6), tmp_path / "run"))
  assert "training text of data.train_files=" in line and "checkpoint step 3" in line
  assert "--config.allow_config_change=data.train_files" in line
  allowed = text_config(text_file, 6, allow_config_change=("data.train_files",))
  with caplog.at_level("INFO"):
    results = run(allowed, tmp_path / "run")
  assert "the stream starts at the new text's first batch" in caplog.text
  assert "resumed from step 3" in caplog.text and results["step"] == 6


# ------------------------------------------------------------------------------------------------
# Case 2: another tokenizer file of the same size
# ------------------------------------------------------------------------------------------------


def swap_two_characters(vocab: Path) -> None:
  """Two entries of a char vocabulary trade places: the same size, other ids."""
  text = vocab.read_text(encoding="utf-8")
  assert '"a"' in text and '"e"' in text
  vocab.write_text(
    text.replace('"a"', '"@"').replace('"e"', '"a"').replace('"@"', '"e"'), encoding="utf-8"
  )


@pytest.mark.slow
def test_a_permuted_char_vocabulary_is_refused_on_resume_and_loading(text_run, copy_of, capsys):
  swap_two_characters(copy_of / "vocab.json")
  line = one_line_error(capsys, lambda: run(text_config(text_run[1], 9), copy_of))
  assert "vocab.json is not the tokenizer checkpoint step 6 was trained with" in line
  assert "put the run's own vocab.json back" in line
  for args, step in ((["--step", "3"], 3), (["--average", "2"], 3)):
    line = one_line_error(capsys, translate(copy_of, *args))
    assert f"vocab.json is not the tokenizer checkpoint step {step} was trained with" in line
  assert (copy_of / "checkpoints" / "6").is_dir()  # refused, not deleted as damaged


@pytest.mark.slow
def test_another_runs_sentencepiece_model_of_the_same_size_is_refused(tmp_path, capsys):
  config = smoke.get_config()
  config.update(num_train_steps=3, checkpoint_every_steps=3)
  config.decode.bleu_at_end = False
  run(config, tmp_path / "run")
  with gzip.open(DEFAULT_SOURCE_DIR / "train.en.gz", "rt", encoding="utf-8") as f:
    reversed_lines = [line.strip()[::-1] for _, line in zip(range(4000), f, strict=False)]
  train_sentencepiece(reversed_lines, tmp_path / "other.model", config.data.vocab_size)
  shutil.copyfile(tmp_path / "other.model", tmp_path / "run" / "spm.model")
  line = one_line_error(capsys, translate(tmp_path / "run", "--step", "3"))
  assert "spm.model is not the tokenizer checkpoint step 3 was trained with" in line
  config.num_train_steps = 6
  line = one_line_error(capsys, lambda: run(config, tmp_path / "run"))
  assert "spm.model is not the tokenizer checkpoint step 3 was trained with" in line


# ------------------------------------------------------------------------------------------------
# Case 3: renamed step folders
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_step_folder_renamed_to_another_step_is_refused(text_run, copy_of, capsys):
  (copy_of / "checkpoints" / "6").rename(copy_of / "checkpoints" / "8")
  line = one_line_error(capsys, lambda: run(text_config(text_run[1], 9), copy_of))
  assert "checkpoints/8 holds step 6, not 8" in line and "rename it back to 6" in line
  line = one_line_error(capsys, translate(copy_of, "--step", "8"))
  assert "checkpoints/8 holds step 6, not 8" in line
  assert (copy_of / "checkpoints" / "8").is_dir()  # nothing deleted


@pytest.mark.slow
def test_a_step_folder_renamed_to_no_number_is_named(text_run, copy_of, caplog, capsys):
  """The newest step renamed: resuming would train steps 4 to 6 again, so it is refused; an
  older one renamed is named in a warning and the run resumes from the newest."""
  (copy_of / "checkpoints" / "6").rename(copy_of / "checkpoints" / "abc")
  line = one_line_error(capsys, lambda: run(text_config(text_run[1], 9), copy_of))
  assert "checkpoints/abc holds a checkpoint, but it was saved after step 3, the newest" in line
  assert "rename it back to its step number" in line
  (copy_of / "checkpoints" / "abc").rename(copy_of / "checkpoints" / "6")
  (copy_of / "checkpoints" / "3").rename(copy_of / "checkpoints" / "abc")
  with caplog.at_level("INFO"):
    run(text_config(text_run[1], 6), copy_of)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("holds abc, which is no checkpoint" in w for w in warnings), warnings
  assert "resumed from step 6" in caplog.text


def test_resuming_refuses_a_renamed_step_newer_than_every_step_folder(tmp_path):
  save_steps(tmp_path, (1, 2))
  resumable = lambda: Checkpointer(tmp_path, asynchronous=False).check_resumable()
  (tmp_path / "2").rename(tmp_path / "best")
  with pytest.raises(
    CheckpointError, match="best holds a checkpoint, but it was saved after step 1"
  ):
    resumable()
  (tmp_path / "1").rename(tmp_path / "first")
  with pytest.raises(CheckpointError, match="start again from step 0"):
    resumable()
  (tmp_path / "best").rename(tmp_path / "2")  # only the older one renamed: resumes from 2
  resumable()
  state, _, step = Checkpointer(tmp_path, asynchronous=False).restore({"w": jnp.zeros(4)})
  assert step == 2 and state["w"].tolist() == [2.0] * 4
