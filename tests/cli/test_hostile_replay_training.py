"""Training as a careless user or an adversary runs it, cases found accepted or answered with a
traceback: each now gives the right result, or one line `error: ...` and exit 2.

Grouped by surface: the command line and the environment (subprocesses that stop before any
work), resuming a run (a tiny training), your own data files (read in-process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_line_error, save_steps
from transformer.configs import smoke
from transformer.data.config import DataConfig
from transformer.data.files import FileCorpus
from transformer.errors import UserError
from transformer.runs.checkpoint import Checkpointer, CheckpointError, is_step_name
from transformer.train.loop import run
from transformer.train.metrics import MetricWriter

ROOT = Path(__file__).resolve().parents[2]


def train(workdir: Path, *args: str, env_extra: dict | None = None) -> tuple[int, list[str]]:
  """train.py with `args` after `--config smoke --workdir WORKDIR`: (exit status, stderr
  lines)."""
  result = subprocess.run(
    [sys.executable, "train.py", "--config", "smoke", "--workdir", str(workdir), *args],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})},
    capture_output=True,
    timeout=120,
  )
  return result.returncode, result.stderr.decode().strip().splitlines()


# ------------------------------------------------------------------------------------------------
# The command line and the environment
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", [["--workdir", "{}"], ["--workdir={}"]])
def test_a_second_workdir_is_refused(form, tmp_path):
  """absl took the last --workdir and trained there, without a word about the first."""
  other = tmp_path / "other"
  code, lines = train(tmp_path / "first", *[part.format(other) for part in form])
  assert code == 2 and len(lines) == 1, lines[-8:]
  assert lines[0].startswith("error: --workdir is given 2 times"), lines
  assert not (tmp_path / "first").exists() and not other.exists()


@pytest.mark.parametrize(
  "variable, value",
  [
    ("JAX_ENABLE_X64", "maybe"),
    ("JAX_DEFAULT_MATMUL_PRECISION", "bogus"),
    ("JAX_NUM_CPU_DEVICES", "abc"),
  ],
)
def test_a_jax_variable_that_jax_refuses_is_one_line(variable, value, tmp_path):
  """JAX checks these while it is imported, out of the package's import: a ValueError
  traceback and exit 1."""
  code, lines = train(tmp_path / "run", env_extra={variable: value})
  assert code == 2 and len(lines) == 1, lines[-8:]
  assert lines[0].startswith(f"error: the environment variable {variable}={value!r}"), lines
  assert not (tmp_path / "run").exists()


def test_an_xla_flag_that_xla_does_not_know_is_one_line(tmp_path):
  """XLA ends the process from C++ on an unknown flag (its log line and exit 1), once the
  command is already working; the command checks the flags first."""
  flags = "--xla_force_host_platform_device_count=2 --xla_no_such_flag=3"
  code, lines = train(tmp_path / "run", env_extra={"XLA_FLAGS": flags})
  assert code == 2 and len(lines) == 1, lines[-8:]
  assert lines[0].startswith("error: XLA_FLAGS holds --xla_no_such_flag=3, a flag"), lines
  assert not (tmp_path / "run").exists()


def test_a_program_importing_the_package_gets_jaxs_exception():
  result = subprocess.run(
    [sys.executable, "-c", "import transformer"],
    cwd=ROOT,
    env={**os.environ, "JAX_ENABLE_X64": "maybe"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1 and "ValueError: invalid truth value" in result.stderr


# ------------------------------------------------------------------------------------------------
# Resuming a run
# ------------------------------------------------------------------------------------------------


def smoke_config(steps: int):
  config = smoke.get_config()
  config.update(num_train_steps=steps, checkpoint_every_steps=3, keep_checkpoints=5)
  config.decode.bleu_at_end = False
  return config


@pytest.mark.slow
def test_resuming_past_num_train_steps_is_refused(tmp_path, capsys):
  """A run at step 6 started again with num_train_steps=3 trained nothing, exported the step-6
  model and recorded num_train_steps=3 in its config.json."""
  run(smoke_config(6), tmp_path)
  exported = (tmp_path / "model" / "params.safetensors").read_bytes()
  line = one_line_error(capsys, lambda: run(smoke_config(3), tmp_path))
  assert "is at checkpoint step 6, past num_train_steps=3" in line
  assert "--config.num_train_steps=6" in line
  assert '"num_train_steps": 6' in (tmp_path / "config.json").read_text()
  assert (tmp_path / "model" / "params.safetensors").read_bytes() == exported
  # The same number of steps again finishes the run as before.
  assert run(smoke_config(6), tmp_path)["step"] == 6


def test_a_file_where_the_checkpoints_go_is_refused_before_training(tmp_path, capsys):
  """Orbax found out at the first save, in a thread with its traceback, once the first steps
  had been trained for nothing."""
  (tmp_path / "checkpoints").write_text("not a folder\n")
  line = one_line_error(capsys, lambda: run(smoke_config(6), tmp_path))
  assert f"{tmp_path / 'checkpoints'} is not a folder" in line
  assert not (tmp_path / "metrics.jsonl").exists()
  assert (tmp_path / "checkpoints").read_text() == "not a folder\n"


def test_metrics_appended_after_a_line_cut_short_stay_whole(tmp_path):
  """A crash (or a full disk) cut the last line of metrics.jsonl short; the resumed run's first
  record continued that line, and readers lost both."""
  whole = json.dumps({"step": 1, "train/loss": 6.5})
  (tmp_path / "metrics.jsonl").write_text(whole + "\n" + whole[:-9], encoding="utf-8")
  writer = MetricWriter(tmp_path)
  writer.write(2, {"train/loss": 6.0})
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
  assert lines[:2] == [whole, whole[:-9]]
  assert json.loads(lines[2])["step"] == 2 and len(lines) == 3


def test_metrics_appended_to_whole_lines_add_no_blank_line(tmp_path):
  for step in (1, 2):
    writer = MetricWriter(tmp_path)
    writer.write(step, {"train/loss": 6.0})
    writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]


@pytest.mark.parametrize("name", ["0002", "\u0662", "\uff12"], ids=["zeros", "arabic", "fullwidth"])
def test_a_step_renamed_to_digits_orbax_does_not_read_is_refused(name, tmp_path, caplog):
  """ "0002", an Arabic-Indic or a full-width 2 pass str.isdigit, so the renamed folder was
  neither named nor refused, while Orbax ignored it: the run went back to step 1 without a
  word and trained step 2 again."""
  save_steps(tmp_path, (1, 2))
  (tmp_path / "2").rename(tmp_path / name)
  with pytest.raises(CheckpointError, match="saved after step 1"):
    Checkpointer(tmp_path, asynchronous=False).check_resumable()
  assert f"holds {name}, which is no checkpoint" in caplog.text


def test_step_names_are_what_orbax_reads():
  assert [is_step_name(n) for n in ("0", "7", "1400")] == [True] * 3
  assert not any(is_step_name(n) for n in ("", "07", "-1", "+7", " 7", "\u0667", "7.bak"))


# ------------------------------------------------------------------------------------------------
# Your own data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tsv", "lang"])
def test_parallel_files_with_windows_line_ends_are_refused(layout, tmp_path):
  """Lines end at "\\n" only: every target of a CRLF file kept its "\\r", a character of the
  char vocabulary that the model learned to emit at the end of every sentence."""
  if layout == "tsv":
    (tmp_path / "train.tsv").write_bytes(b"a dog\tein hund\r\ntwo men\tzwei manner\r\n" * 20)
    pattern, damaged = "train.tsv", "train.tsv"
  else:
    (tmp_path / "train.en").write_bytes(b"a dog\ntwo men\n" * 20)
    (tmp_path / "train.de").write_bytes(b"ein hund\r\nzwei manner\r\n" * 20)
    pattern, damaged = "train.{lang}", "train.de"
  data = DataConfig(
    dataset="parallel", train_files=(str(tmp_path / pattern),), tokenizer_type="char", vocab_size=0
  )
  with pytest.raises(UserError) as error:
    FileCorpus.of(data).pairs(data.train_split)
  message = str(error.value)
  assert "\n" not in message
  assert f"{tmp_path / damaged} line 1 ends with a carriage return" in message
  assert "dos2unix" in message


def test_parallel_files_with_unix_line_ends_still_read(tmp_path):
  (tmp_path / "train.tsv").write_bytes(b"a dog\tein hund\ntwo men\tzwei manner\n" * 20)
  data = DataConfig(
    dataset="parallel", train_files=(str(tmp_path / "train.tsv"),), validation_fraction=0.5
  )
  assert FileCorpus.of(data).pairs(data.train_split)[:2] == [
    ("a dog", "ein hund"),
    ("two men", "zwei manner"),
  ]


@pytest.mark.parametrize("dataset", ["multi30k", "parallel"])
def test_eval_windows_on_sentences_is_refused(dataset, tmp_path):
  """data.eval_windows limits the validation windows of running text; on a dataset of sentences
  it was accepted and did nothing (the whole validation split was scored)."""
  from transformer.config import Config

  config = smoke.get_config()
  config.data.eval_windows = 16
  if dataset == "parallel":
    for split in ("train", "val"):
      for lang in ("en", "de"):
        (tmp_path / f"{split}.{lang}").write_text("a b\nc d\n", encoding="utf-8")
    config.data.dataset = "parallel"
    config.data.train_files = (str(tmp_path / "train.{lang}"),)
    config.data.eval_files = (str(tmp_path / "val.{lang}"),)
  with pytest.raises(
    UserError, match=r"data\.eval_windows=16 .*data\.dataset=text.*leave data\.eval_windows at 0"
  ):
    Config.of(config)
