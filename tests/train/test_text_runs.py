"""Training on your own text files end to end: the shakespeare_char recipe on a small text
resumed mid-epoch, exported with its char vocabulary, sampled from; mlm on text; the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transformer.configs import shakespeare_char
from transformer.runs.artifact import read_model
from transformer.runs.translator import Translator
from transformer.train.loop import run

pytestmark = pytest.mark.slow  # each runs training end to end

TEXT = "".join(
  f"{who}:\nShall I compare thee to a summer's day, number {i}?\n\n"
  for i in range(400)
  for who in ("ROMEO", "JULIET")
)


def text_config(text_file: Path, steps: int, task: str = "lm"):
  config = shakespeare_char.get_config()
  config.task = task
  config.model.update(d_model=32, num_heads=2, d_ff=64, num_decoder_layers=1, max_len=32)
  if task == "mlm":
    config.model.update(num_encoder_layers=1, num_decoder_layers=0, norm="post")
  config.data.update(
    train_files=(str(text_file),), max_len=32, tokens_per_batch=8 * 32, eval_windows=16
  )
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 3
  return config


def train_losses(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "sonnets.txt"
  path.write_text(TEXT, encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, text_file):
  workdir = tmp_path_factory.mktemp("lm")
  return workdir, run(text_config(text_file, 6), workdir)


def test_char_lm_run_records_its_vocabulary_and_exports_it(uninterrupted):
  workdir, results = uninterrupted
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["vocab_size"] == config["model"]["vocab_size"] == 5 + len(set(TEXT))
  spec, _, tokenizer_path, meta = read_model(workdir)
  assert tokenizer_path.name == "vocab.json" and meta["tokenizer_file"] == "vocab.json"
  assert spec.running_text and not (workdir / "model" / "spm.model").exists()
  assert results["step"] == 6 and np.isfinite(results["eval/loss"])


def test_resume_mid_epoch_over_file_data_equals_the_uninterrupted_run(
  uninterrupted, text_file, tmp_path
):
  reference, _ = uninterrupted
  run(text_config(text_file, 3), tmp_path)  # stops after the checkpoint of step 3
  run(text_config(text_file, 6), tmp_path)  # vocab_size 0 again: the run's recorded size
  want, got = train_losses(reference), train_losses(tmp_path)
  for step in range(1, 7):
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_sampling_continues_the_prompt_past_the_context(uninterrupted):
  workdir, _ = uninterrupted
  translator = Translator(workdir)
  first = translator.continue_text(["ROMEO:"], max_new_tokens=70, temperature=0.0)
  assert first == translator.continue_text(["ROMEO:"], max_new_tokens=70, temperature=0.0)
  assert set(first[0]) <= set(TEXT)  # characters of the text, never a special id
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "transformer.sample",
      "--workdir",
      str(workdir),
      "--prompt",
      "JU",
      "--max_new_tokens",
      "40",
      "--top_k",
      "5",
      "--seed",
      "3",
      "--num_samples",
      "2",
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.startswith("JU") and "\n---\n" in out.stdout


def test_masked_lm_on_text(text_file, tmp_path):
  results = run(text_config(text_file, 3, task="mlm"), tmp_path)
  assert results["step"] == 3 and np.isfinite(results["eval/loss"])


def test_the_command_line_reads_text_files_for_lm(text_file, tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--config",
      "lm",
      f"--workdir={tmp_path / 'run'}",
      "--config.data.dataset=text",
      f"--config.data.train_files={text_file}",
      "--config.data.vocab_size=60",
      "--config.data.tokenizer_type=bpe",
      "--config.num_train_steps=2",
      "--config.model.num_decoder_layers=1",
      "--config.model.d_model=32",
      "--config.model.d_ff=64",
    ],
    capture_output=True,
    text=True,
    cwd=Path(__file__).resolve().parents[2],
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "step 2:" in done.stdout
  assert "d_model 32, 1 decoder layers," in done.stderr  # what a language model builds
