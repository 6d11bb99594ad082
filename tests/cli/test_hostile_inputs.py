"""Damaged runs and hostile inputs: each gives one line naming the problem and the fix, exit 2,
no traceback, and nothing lost; a damaged checkpoint is never used.

Grouped by kind: configuration values, data files, command arguments and input, damaged
checkpoints and exports, concurrent runs. `SM` stands for a smoke training run.
"""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

from tests.helpers import one_line_error
from transformer import translate as translate_command
from transformer import visualize as visualize_command
from transformer.cli import check_stopped, run_cli
from transformer.configs import smoke
from transformer.data.multi30k import DEFAULT_SOURCE_DIR
from transformer.train.loop import run

pytestmark = pytest.mark.slow  # training runs shared by the module, commands in subprocesses

ROOT = Path(__file__).resolve().parents[2]


def command(
  *args, stdin=subprocess.DEVNULL, input_bytes: bytes | None = None, env_extra: dict | None = None
):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    stdin=None if input_bytes is not None else stdin,
    input=input_bytes,
    timeout=600,
  )


def smoke_config(steps: int = 6, **changes):
  config = smoke.get_config()
  config.update(num_train_steps=steps, checkpoint_every_steps=3, keep_checkpoints=5)
  config.decode.bleu_at_end = False
  for key, value in changes.items():
    block, _, name = key.rpartition(".")
    (config[block] if block else config)[name] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("trained")
  run(smoke_config(), workdir)
  return workdir


@pytest.fixture
def copy_of(trained, tmp_path):
  destination = tmp_path / "run"
  shutil.copytree(trained, destination)
  return destination


# ------------------------------------------------------------------------------------------------
# Configuration values: refused before any work, naming the key
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "change, message",
  [
    ({"data.mlm_select_rate": 0.0}, "data.mlm_select_rate must be in (0, 1)"),
    ({"data.mlm_select_rate": 2.0}, "data.mlm_select_rate must be in (0, 1)"),
    ({"data.tokenizer_sentences": -5}, "data.tokenizer_sentences must be positive"),
    ({"data.tokenizer_sentences": 0}, "data.tokenizer_sentences must be positive"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"data.length_buckets": (8,)}, "data.length_buckets=(8,) end below data.max_len=32"),
    ({"profile_steps": (5, 2)}, "profile_steps=(5, 2) must be two steps first,last"),
    ({"parallel.barrier_timeout_s": 0.0}, "parallel.barrier_timeout_s must be positive"),
  ],
)
def test_config_values(change, message, tmp_path, capsys):
  assert message in one_line_error(capsys, lambda: run(smoke_config(**change), tmp_path))


def test_an_impossible_model_size_is_refused_before_allocation(tmp_path, capsys):
  began = time.time()
  line = one_line_error(
    capsys,
    lambda: run(smoke_config(**{"model.d_model": 100_000_000, "model.num_heads": 1}), tmp_path),
  )
  assert "parameters" in line and "GB" in line and "shrink it" in line
  assert time.time() - began < 60


def test_a_position_table_too_large_is_refused_before_allocation(tmp_path, capsys):
  """The sinusoidal table is no parameter, but every trace builds it: the memory estimate
  counts it (max_len=1e8 died of an ArrayMemoryError after a minute)."""
  began = time.time()
  line = one_line_error(capsys, lambda: run(smoke_config(**{"model.max_len": 10**10}), tmp_path))
  assert "model.max_len=10000000000 needs a sinusoidal position table" in line
  assert time.time() - began < 60


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.model.foo.bar=1"], "unknown config key model.foo.bar"),
    (["--config", "/nonexistent/recipe.py"], "cannot load --config"),
    (["--workdir", ""], "--workdir is empty"),
    (["--config.data.length_buckets=abc"], "data.length_buckets must be a tuple of int"),
  ],
)
def test_train_command_arguments(args, message):
  workdir = [] if "--workdir" in args else ["--workdir", "unused"]  # one --workdir a command
  result = command("train.py", "--config", "smoke", *workdir, *args)
  lines = result.stderr.decode().strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines[-5:]


def test_a_recipe_with_a_syntax_error_or_no_config(tmp_path):
  (tmp_path / "broken.py").write_text("def get_config(:\n  pass\n")
  (tmp_path / "fortytwo.py").write_text("def get_config():\n  return 42\n")
  for name, message in (
    ("broken.py", "line 1: invalid syntax"),
    ("fortytwo.py", "returned a int, not the ConfigDict"),
  ):
    result = command("train.py", "--config", str(tmp_path / name), "--workdir", str(tmp_path))
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines


# ------------------------------------------------------------------------------------------------
# Data files
# ------------------------------------------------------------------------------------------------


def corpus(tmp_path: Path, **replaced: list[str]) -> Path:
  """A copy of the shipped corpus with some files' lines replaced ({"train_en": [...]})."""
  folder = tmp_path / "corpus"
  shutil.copytree(DEFAULT_SOURCE_DIR, folder)
  for key, lines in replaced.items():
    stem, lang = key.rsplit("_", 1)
    with gzip.open(folder / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
  return folder


def test_an_empty_training_file(tmp_path, capsys):
  folder = corpus(tmp_path, train_en=[], train_de=[])
  line = one_line_error(
    capsys, lambda: run(smoke_config(**{"data.source_dir": str(folder)}), tmp_path / "run")
  )
  assert "train.en.gz" in line and "hold no lines" in line


def test_a_validation_file_of_empty_lines(tmp_path, capsys):
  folder = corpus(tmp_path, val_en=[""] * 10, val_de=[""] * 10)
  line = one_line_error(
    capsys,
    lambda: run(
      smoke_config(**{"data.source_dir": str(folder), "data.eval_split": "validation"}),
      tmp_path / "run",
    ),
  )
  assert "validation has no pair with text on both sides" in line


def test_a_garbage_tokenizer_in_the_workdir(tmp_path, capsys):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "spm.model").write_bytes(b"not a model at all")
  line = one_line_error(capsys, lambda: run(smoke_config(), tmp_path / "run"))
  assert "spm.model is not a SentencePiece model" in line


# ------------------------------------------------------------------------------------------------
# Command arguments and input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "args, message",
  [
    (["--batch_size", "-1"], "--batch_size: -1 must be at least 1"),
    (["--batch_size", "0"], "--batch_size: 0 must be at least 1"),
    (["--alpha", "nan"], "alpha (length penalty) must be a finite number"),
    (["--beam_size", "0"], "--beam_size: 0 must be at least 1"),
    (["--stop", "fast"], "argument --stop: invalid choice: 'fast'"),
    (["--max_new_tokens", "-5"], "--max_new_tokens: -5 must be at least 1"),
  ],
)
def test_translate_arguments(args, message, trained, capsys):
  line = one_line_error(
    capsys, lambda: translate_command.main(["--workdir", str(trained), *args, "A dog runs."])
  )
  assert message in line


def test_visualize_alpha_nan(trained, tmp_path, capsys):
  line = one_line_error(
    capsys,
    lambda: visualize_command.main(
      ["--workdir", str(trained), "--out", str(tmp_path), "--alpha", "nan", "a dog"]
    ),
  )
  assert "alpha (length penalty) must be a finite number" in line


def test_translate_input_streams(trained, tmp_path):
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("Ein Mädchen läuft.\n".encode("latin-1"))
  cases = [
    (["--file", str(latin)], None, f"{latin} line 1 is not UTF-8"),
    ([], b"A dog runs.\n\xff\xfe broken\n", "stdin line 2 is not UTF-8"),
  ]
  for extra, stdin, message in cases:
    result = command(
      "-m",
      "transformer.translate",
      "--workdir",
      str(trained),
      *extra,
      input_bytes=stdin if stdin is not None else b"",
    )
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines
  closed = subprocess.run(
    f"{sys.executable} -m transformer.translate --workdir {trained} <&-",
    shell=True,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert closed.returncode == 2 and "stdin is closed" in closed.stderr, closed.stderr


def test_unknown_pieces_are_noted(trained, caplog, capsys):
  with caplog.at_level("WARNING"):
    translate_command.main(["--workdir", str(trained), "Ein 🐶 läuft über 東京 مرحبا."])
  assert "outside the vocabulary (<unk>)" in caplog.text
  assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.parametrize(
  "damage, message",
  [
    ("empty", "does not describe a run (no 'task')"),
    ("truncated", "config.json is not valid JSON"),
    ("nested", "config.json is not valid JSON (nested too deeply)"),
    ("d_model", "does not fit the model: parameter"),
    ("num_decoder_layers", "does not fit the model: parameter"),
    ("max_len", "config.json gives model.max_len=100000000, a position table far larger"),
  ],
)
def test_a_hand_edited_config_json_with_a_checkpoint(damage, message, copy_of, capsys):
  path = copy_of / "config.json"
  text = path.read_text()
  if damage == "empty":
    path.write_text("{}")
  elif damage == "truncated":
    path.write_text(text[: len(text) // 2])
  elif damage == "nested":
    path.write_text("[" * 100_000 + "]" * 100_000)
  else:
    values = json.loads(text)
    values["model"][damage] = {"d_model": 64, "num_decoder_layers": 2, "max_len": 10**8}[damage]
    if damage == "d_model":
      values["model"]["num_heads"] = 2
    path.write_text(json.dumps(values))
  line = one_line_error(
    capsys, lambda: translate_command.main(["--workdir", str(copy_of), "--step", "6", "A dog."])
  )
  assert message in line


def test_a_garbage_tokenizer_in_the_export(copy_of, capsys):
  (copy_of / "model" / "spm.model").write_bytes(b"garbage")
  line = one_line_error(
    capsys, lambda: translate_command.main(["--workdir", str(copy_of), "A dog."])
  )
  assert "spm.model does not match the checksum" in line


def test_an_empty_workdir_argument(capsys):
  line = one_line_error(capsys, lambda: translate_command.main(["--workdir", "", "A dog."]))
  assert "--workdir is empty" in line


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ------------------------------------------------------------------------------------------------


SENTENCE = "A little girl climbs into a wooden playhouse."


def data_files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d")


def flip(path: Path, offset: int = 0, count: int = 16) -> None:
  data = bytearray(path.read_bytes())
  start = offset % max(len(data) - count, 1)
  for i in range(start, min(start + count, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "random", "delete", "metadata"])
def test_translate_never_uses_a_damaged_step(damage, copy_of, capsys, caplog):
  step_dir = copy_of / "checkpoints" / "6"
  files = data_files(step_dir)
  assert files
  for path in files:
    if damage == "flip":
      flip(path, offset=len(path.read_bytes()) // 2)
    elif damage == "truncate":
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    elif damage == "random":
      path.write_bytes(os.urandom(len(path.read_bytes())))
    elif damage == "delete":
      path.unlink()
  if damage == "metadata":
    (step_dir / "state" / "_METADATA").unlink()
  line = one_line_error(
    capsys, lambda: translate_command.main(["--workdir", str(copy_of), "--step", "6", "A dog."])
  )
  assert "checkpoint step 6" in line and "is damaged" in line
  # An average leaves the damaged step out, with a warning; the export does not depend on it.
  expected = {}
  for args in (["--step", "3"], ["--average", "2"], []):
    with caplog.at_level("WARNING"):
      argv = ["--workdir", str(copy_of), *args, SENTENCE]
      code = run_cli(lambda argv=argv: translate_command.main(argv))
    assert code == 0
    expected[tuple(args)] = capsys.readouterr().out
  assert "averaging leaves out checkpoint step 6" in caplog.text
  assert expected[("--average", "2")] == expected[("--step", "3")]


def test_training_skips_a_flipped_checkpoint_and_continues_exactly(tmp_path, caplog):
  """A few flipped bytes in the newest checkpoint: training resumes from the one before it,
  names the damaged step, and its losses then equal an uninterrupted run's."""
  reference = tmp_path / "reference"
  run(smoke_config(9), reference)
  damaged = tmp_path / "damaged"
  run(smoke_config(6), damaged)
  for path in data_files(damaged / "checkpoints" / "6"):
    flip(path, offset=len(path.read_bytes()) // 2)
  with caplog.at_level("INFO"):
    run(smoke_config(9), damaged)
  assert "checkpoint step 6" in caplog.text and "is damaged" in caplog.text
  assert "resumed from step 3" in caplog.text
  losses = {}
  for workdir in (reference, damaged):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses[workdir.name] = {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}
  for step in range(4, 10):
    assert losses["damaged"][step] == pytest.approx(losses["reference"][step], rel=1e-6), step


def test_every_checkpoint_damaged_is_one_line(copy_of, capsys):
  for step in (3, 6):
    for path in data_files(copy_of / "checkpoints" / str(step)):
      path.write_bytes(b"")
  line = one_line_error(capsys, lambda: run(smoke_config(9), copy_of))
  assert "every checkpoint in" in line and "is damaged" in line


# ------------------------------------------------------------------------------------------------
# Concurrent runs, warm starts, signals
# ------------------------------------------------------------------------------------------------


def test_a_second_run_on_a_busy_workdir_is_refused_at_once(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.Popen(
    [
      sys.executable,
      "train.py",
      "--config",
      "smoke",
      "--workdir",
      str(workdir),
      "--config.num_train_steps=400",
      "--config.decode.bleu_at_end=False",
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not (workdir / ".lock").exists():
      time.sleep(0.2)
    time.sleep(1.0)
    began = time.time()
    second = command("train.py", "--config", "smoke", "--workdir", str(workdir))
    lines = second.stderr.decode().strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, lines
    assert f"is in use by process {first.pid}" in lines[0]
    assert time.time() - began < 30
    assert first.poll() is None  # the first run goes on
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
  assert first.returncode == 130


@pytest.mark.parametrize(
  "key, value",
  [
    ("model.activation", "gelu"),  # the relu weights would be exported as a gelu model
    ("model.position", "learned"),
    ("data.tokens_per_batch", 1024),  # the stored stream position means another batch
    ("data.packing", True),
    ("data.train_split", "train[:1000]"),
    ("data.vocab_size", 400),
  ],
)
def test_resuming_under_another_model_or_data_plan_is_refused(key, value, copy_of, capsys):
  before = (copy_of / "config.json").read_text()
  line = one_line_error(capsys, lambda: run(smoke_config(**{key: value}), copy_of))
  assert f"was trained with {key}=" in line and f"--config.allow_config_change={key}" in line
  assert (copy_of / "config.json").read_text() == before


def test_resuming_checkpoints_without_their_config_json_is_refused(copy_of, capsys):
  (copy_of / "config.json").unlink()
  line = one_line_error(capsys, lambda: run(smoke_config(), copy_of))
  assert "has checkpoints but no config.json" in line and "allow_config_change=all" in line
  assert not (copy_of / "config.json").exists()


def test_init_from_a_run_with_another_tokenizer_is_refused(trained, tmp_path, capsys):
  other = tmp_path / "other"
  line = one_line_error(
    capsys,
    lambda: run(smoke_config(2, **{"data.vocab_size": 400, "init_from": str(trained)}), other),
  )
  assert "its tokenizer" in line and "is not this run's" in line


def test_an_interrupt_while_preparing_loses_nothing(tmp_path):
  """Ctrl-C while the tokenizer and token cache are being built: one line, exit 130, and the
  next start finds no half-written file (it trains as if nothing had happened)."""
  workdir = tmp_path / "run"
  cache = {"TRANSFORMER_CACHE_DIR": str(tmp_path / "cache")}
  process = subprocess.Popen(
    [sys.executable, "train.py", "--config", "smoke", "--workdir", str(workdir)],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **cache},
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 120
  while time.time() < deadline and not (workdir / ".lock").exists():
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=120)
  lines = err.strip().splitlines()
  assert process.returncode == 130 and lines[-1].startswith("stopped"), err[-2000:]
  assert "Traceback" not in err
  again = command(
    "train.py",
    "--config",
    "smoke",
    "--workdir",
    str(workdir),
    "--config.num_train_steps=2",
    "--config.decode.bleu_at_end=False",
    env_extra=cache,
  )
  assert again.returncode == 0, again.stderr.decode()[-2000:]


# ------------------------------------------------------------------------------------------------
# A full disk: simulated by a file-size limit (RLIMIT_FSIZE), which fails writes past it with
# EFBIG the way a full disk fails them with ENOSPC (Python ignores the SIGXFSZ it would raise)
# ------------------------------------------------------------------------------------------------


def limited_train(workdir: Path, cache: Path, limit: int | None, *args: str):
  import resource

  def limit_writes():
    if limit is not None:
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  return subprocess.run(
    [sys.executable, "train.py", "--config", "smoke", "--workdir", str(workdir), *args],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMER_CACHE_DIR": str(cache)},
    capture_output=True,
    text=True,
    preexec_fn=limit_writes,
    timeout=600,
  )


def test_a_full_disk_while_preparing_the_data_is_one_line(tmp_path):
  failed = limited_train(tmp_path / "run", tmp_path / "cache", 20_000)
  last = failed.stderr.strip().splitlines()[-1]
  assert failed.returncode == 2 and last.startswith("error: a write failed (File too large)")
  assert "Traceback" not in failed.stderr and "free space" in last


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path):
  workdir, cache = tmp_path / "run", tmp_path / "cache"
  first = limited_train(workdir, cache, None, "--config.num_train_steps=3")
  assert first.returncode == 0, first.stderr[-2000:]
  # Steps 4-6 train; the save of step 6 writes files larger than the limit.
  failed = limited_train(workdir, cache, 100_000)
  assert failed.returncode == 2, failed.stderr[-2000:]
  assert failed.stderr.strip().splitlines()[-1].startswith("error: a write failed")
  # Orbax's threads logged the failed write with ~650 lines of tracebacks, and its temporary
  # step folder kept the disk full.
  assert "Traceback" not in failed.stderr and "Event loop is closed" not in failed.stderr
  assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["3"]
  resumed = limited_train(workdir, cache, None, "--config.num_train_steps=7")
  assert resumed.returncode == 0 and "resumed from step 3" in resumed.stderr, resumed.stderr[-2000:]


@pytest.fixture
def small_disk(tmp_path):
  """A 32 MB tmpfs (where this user may mount one): writes past it fail with ENOSPC."""
  folder = tmp_path / "disk"
  folder.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)], capture_output=True
  )
  if mounted.returncode:
    pytest.skip("cannot mount a tmpfs here")
  yield folder
  subprocess.run(["umount", str(folder)], check=True)


def test_a_real_enospc_while_saving_a_checkpoint(small_disk, tmp_path):
  workdir, cache = small_disk / "run", tmp_path / "cache"
  first = limited_train(workdir, cache, None, "--config.num_train_steps=3")
  assert first.returncode == 0, first.stderr[-2000:]
  free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
  (small_disk / "filler").write_bytes(b"\0" * max(free - 60_000, 0))
  failed = limited_train(workdir, cache, None)
  lines = failed.stderr.strip().splitlines()
  assert failed.returncode == 2 and lines[-1].startswith(
    "error: a write failed (No space left on device)"
  ), failed.stderr[-2000:]
  assert "Traceback" not in failed.stderr and "Event loop is closed" not in failed.stderr
  assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["3"]
  (small_disk / "filler").unlink()
  resumed = limited_train(workdir, cache, None, "--config.num_train_steps=7")
  assert resumed.returncode == 0 and "resumed from step 3" in resumed.stderr, resumed.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# evaluate on files: lines split as the corpus reader splits them, blank and empty input
# ------------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str], prefix: str = "") -> Path:
  path.write_text(prefix + "".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def test_evaluate_files_split_lines_at_newlines_only(tmp_path):
  """A U+2028, a form feed or a \\x1c inside a line stays in it (str.splitlines cut there and
  shifted every later pair); a BOM is not part of the first reference; CRLF ends are dropped."""
  from transformer.evaluate import read_pairs

  src = write_lines(tmp_path / "src", ["A dog\u2028runs.", "Two men\ftalk.", "A\x1ccat.", "Hi."])
  ref = tmp_path / "ref"
  ref.write_bytes("\ufeffEin Hund.\r\nZwei Männer.\r\nEine Katze.\r\nHallo.\r\n".encode())
  assert read_pairs(str(src), str(ref)) == [
    ("A dog\u2028runs.", "Ein Hund."),
    ("Two men\ftalk.", "Zwei Männer."),
    ("A\x1ccat.", "Eine Katze."),
    ("Hi.", "Hallo."),
  ]


@pytest.mark.parametrize(
  "sources, references, message",
  [
    ([], [], "have no pair with text on both sides (0 lines)"),
    (["", " "], ["", "\t"], "have no pair with text on both sides (2 lines)"),
    (["a", ""], ["", "b"], "have no pair with text on both sides (2 lines)"),
    (["a"], ["b", "c"], "has 1 lines but"),
  ],
)
def test_evaluate_files_without_a_pair_to_score(sources, references, message, trained, capsys):
  """An empty or all-blank file scored 0.00 (or raised IndexError): refused as training refuses
  such an evaluation split."""
  from transformer import evaluate

  folder = trained.parent / f"files-{len(sources)}-{len(references)}-{hash(message) % 1000}"
  folder.mkdir(exist_ok=True)
  src, ref = write_lines(folder / "src", sources), write_lines(folder / "ref", references)
  argv = ["--workdir", str(trained), "--src", str(src), "--ref", str(ref), "--out", str(folder)]
  line = one_line_error(capsys, lambda: evaluate.main(argv))
  assert message in line
  assert not list(folder.glob("*.json"))


def test_evaluate_batch_size_beyond_memory(trained, tmp_path, capsys):
  """Every batch is padded to --batch_size rows: 800000000 of them allocated for minutes."""
  from transformer import evaluate

  src, ref = write_lines(tmp_path / "src", ["A dog."]), write_lines(tmp_path / "ref", ["Hund."])
  argv = ["--workdir", str(trained), "--src", str(src), "--ref", str(ref), "--batch_size"]
  began = time.time()
  line = one_line_error(capsys, lambda: evaluate.main([*argv, "800000000"]))
  assert "--batch_size 800000000 needs" in line and "lower it" in line
  assert time.time() - began < 60


def test_evaluate_gives_a_blank_source_a_blank_hypothesis(trained, tmp_path, capsys):
  from transformer import evaluate

  src = write_lines(tmp_path / "src", ["A dog runs on the beach.", "", "Two men talk."])
  ref = write_lines(tmp_path / "ref", ["Ein Hund läuft am Strand.", "", "Zwei Männer reden."])
  argv = ["--workdir", str(trained), "--src", str(src), "--ref", str(ref), "--out", str(tmp_path)]
  assert run_cli(lambda: evaluate.main(argv)) == 0
  (hypotheses,) = tmp_path.glob("src.*.txt")
  lines = hypotheses.read_text(encoding="utf-8").split("\n")
  assert len(lines) == 4 and lines[1] == "" and lines[3] == ""


@pytest.mark.parametrize("flag", ["--src", "--ref"])
def test_a_directory_for_a_file_argument(flag, trained, tmp_path, capsys):
  from transformer import evaluate

  files = {
    "--src": write_lines(tmp_path / "src", ["a"]),
    "--ref": write_lines(tmp_path / "r", ["b"]),
  }
  files[flag] = tmp_path
  argv = ["--workdir", str(trained), "--src", str(files["--src"]), "--ref", str(files["--ref"])]
  line = one_line_error(capsys, lambda: evaluate.main(argv))
  assert f"{flag} {tmp_path} is a directory: give a text file" in line


def test_translate_file_arguments_that_are_not_regular_files(trained, tmp_path):
  """A directory is named as one; /dev/stdin (a pipe, not a regular file) is read."""
  result = command(
    "-m", "transformer.translate", "--workdir", str(trained), "--file", str(tmp_path)
  )
  lines = result.stderr.decode().strip().splitlines()
  assert result.returncode == 2 and lines == [
    f"error: --file {tmp_path} is a directory: give a text file, one sentence a line"
  ]
  result = command(
    "-m",
    "transformer.translate",
    "--workdir",
    str(trained),
    "--file",
    "/dev/stdin",
    input_bytes=b"A dog runs.\n\nTwo men talk.\n",
  )
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  assert len(result.stdout.decode().split("\n")) == 4


def test_evaluate_export_takes_the_workdir_lock(copy_of, capsys):
  """--export replaces WORKDIR/model: never under a running train.py."""
  from transformer import evaluate
  from transformer.runs.lock import WorkdirLock

  before = (copy_of / "model" / "params.safetensors").read_bytes()
  with WorkdirLock(copy_of, "training"):
    line = one_line_error(
      capsys, lambda: evaluate.main(["--workdir", str(copy_of), "--step", "3", "--export"])
    )
  assert f"{copy_of} is in use by process {os.getpid()}" in line
  assert (copy_of / "model" / "params.safetensors").read_bytes() == before


# ------------------------------------------------------------------------------------------------
# Output, locale and the Python API
# ------------------------------------------------------------------------------------------------

ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def test_commands_under_an_ascii_locale(trained, tmp_path):
  """Files are written as UTF-8 and German text is printed whatever the locale (evaluate left
  a 0-byte .json, translate failed on its own arguments)."""
  german = "Ein Mädchen läuft über die Straße."
  result = command(
    "-m", "transformer.translate", "--workdir", str(trained), german, env_extra=ASCII_LOCALE
  )
  assert result.returncode == 0 and len(result.stdout.splitlines()) == 1, result.stderr[-2000:]
  src = write_lines(tmp_path / "src", ["A girl runs across the street."])
  ref = write_lines(tmp_path / "ref", [german])
  result = command(
    "-m",
    "transformer.evaluate",
    "--workdir",
    str(trained),
    "--src",
    str(src),
    "--ref",
    str(ref),
    "--out",
    str(tmp_path / "out"),
    env_extra=ASCII_LOCALE,
  )
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  (scores,) = (tmp_path / "out").glob("*.json")
  assert json.loads(scores.read_text(encoding="utf-8"))["bleu"] >= 0


def test_training_to_its_summary_under_an_ascii_locale(copy_of):
  """The finish of a run (export, scores, the summary with German references) under an ASCII
  locale: it exited 2 at the summary after finishing everything."""
  result = command(
    "train.py",
    "--config",
    "smoke",
    "--workdir",
    str(copy_of),
    "--config.checkpoint_every_steps=3",
    "--config.keep_checkpoints=5",
    env_extra=ASCII_LOCALE,
  )
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  assert "reference:" in result.stdout.decode("utf-8")


def test_output_that_cannot_be_written(trained):
  """stdout on a full device is one line about the output, not disk advice about the workdir;
  a reader that went away (`| head -1`) ends the command quietly, as SIGPIPE would."""
  full = subprocess.run(
    f"{sys.executable} -m transformer.translate --workdir {trained} 'A dog.' > /dev/full",
    shell=True,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  lines = full.stderr.strip().splitlines()
  assert full.returncode == 2 and len(lines) == 1, full.stderr[-2000:]
  assert lines[0].startswith("error: the output cannot be written (No space left on device)")
  piped = subprocess.run(
    f"yes 'A dog runs.' | head -300 | {sys.executable} -m transformer.translate "
    f"--workdir {trained} --batch_size 8 | head -1; exit ${{PIPESTATUS[2]}}",
    shell=True,
    executable="/bin/bash",
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert piped.returncode == 141 and piped.stderr == "", piped.stderr[-2000:]
  assert len(piped.stdout.splitlines()) == 1


@pytest.mark.parametrize("command", ["evaluate", "visualize"])
def test_every_command_tells_a_full_output_from_a_full_workdir(command, trained, tmp_path):
  (tmp_path / "s.en").write_text("A dog runs.\nTwo men talk.\n")
  (tmp_path / "r.de").write_text("Ein Hund rennt.\nZwei Männer reden.\n")
  args = {
    "evaluate": f"--src {tmp_path / 's.en'} --ref {tmp_path / 'r.de'} --out {tmp_path / 'ev'}",
    "visualize": f"--out {tmp_path / 'vis'} 'A dog runs.'",
  }[command]
  full = subprocess.run(
    f"{sys.executable} -m transformer.{command} --workdir {trained} {args} > /dev/full",
    shell=True,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"},
  )
  lines = full.stderr.strip().splitlines()
  assert full.returncode == 2 and len(lines) == 1, full.stderr[-2000:]
  assert lines[0].startswith("error: the output cannot be written (No space left on device)")


@pytest.mark.parametrize(
  "texts, message",
  [
    ("[42]", "texts must be a list of str; texts[0] is int"),
    ("[None, 'A dog.']", "texts must be a list of str; texts[0] is NoneType"),
    ("'A dog.'", "texts must be a list of str, got str: wrap one in [...]"),
  ],
)
def test_translator_api_with_texts_that_are_not_strings(texts, message, trained):
  """In a fresh interpreter (the tests' type-checking hook would refuse these first)."""
  code = (
    f"import sys; from transformer import Translator; Translator(sys.argv[1]).translate({texts})"
  )
  result = command("-c", code, str(trained))
  assert result.returncode == 1
  assert result.stderr.decode().strip().splitlines()[-1] == f"TypeError: {message}"


# ------------------------------------------------------------------------------------------------
# Signals at other moments: one line and 130, nothing half-written
# ------------------------------------------------------------------------------------------------


def sigterm_inside(monkeypatch, target: str) -> None:
  """`target` (module.function) sends this process SIGTERM before it does its work."""
  module_name, _, name = target.rpartition(".")
  module = __import__(module_name, fromlist=[name])
  original = getattr(module, name)

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, signalled)


def stopped_line(capsys, main) -> str:
  assert run_cli(main) == 130
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("stopped: SIGTERM"), lines
  return lines[0]


@pytest.mark.parametrize(
  "target",
  [
    "transformer.train.setup.training_inputs",  # preparing the data
    "transformer.train.finish.evaluation",  # the final evaluation
    "transformer.runs.artifact._write_meta",  # the export, mid-way
  ],
)
def test_sigterm_outside_the_training_loop(target, copy_of, monkeypatch, capsys):
  """The run has finished its steps: running it again only finishes it (export, evaluation).
  A SIGTERM at any of these moments ended with 143 and no word; the export is left as it was."""
  from transformer.runs.artifact import read_model

  before = {p.name: p.read_bytes() for p in (copy_of / "model").iterdir()}
  sigterm_inside(monkeypatch, target)
  stopped_line(capsys, lambda: run(smoke_config(), copy_of))
  monkeypatch.undo()
  if "evaluation" not in target:  # (the export is done before the final evaluation)
    assert {p.name: p.read_bytes() for p in (copy_of / "model").iterdir()} == before
  read_model(copy_of)
  assert not [p for p in copy_of.iterdir() if p.name.startswith(".model")]


def test_sigterm_while_the_export_is_renamed_into_place(copy_of, monkeypatch, capsys):
  """Between moving the old export aside and the new one in, a signal waits: WORKDIR/model is
  the complete new export, and nothing is left aside."""
  from transformer.runs import artifact

  renames = []

  def replace(source, destination):
    if not renames:
      os.kill(os.getpid(), signal.SIGTERM)
    renames.append(destination)
    os.rename(source, destination)

  monkeypatch.setattr(artifact.os, "replace", replace)
  stopped_line(capsys, lambda: run(smoke_config(), copy_of))
  monkeypatch.undo()
  artifact.read_model(copy_of)
  assert not [p for p in copy_of.iterdir() if p.name.startswith(".model")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_translate_waiting_for_input(signum, trained):
  """SIGTERM, or SIGHUP (its terminal closed), ended translate with 143 (129) and no word."""
  process = subprocess.Popen(
    [sys.executable, "-m", "transformer.translate", "--workdir", str(trained)],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  process.stdin.write(b"A dog runs.\n")
  process.stdin.flush()
  assert process.stdout.readline()  # translated: the model is loaded, stdin is waited on
  process.send_signal(signum)
  _, err = process.communicate(timeout=120)
  lines = err.decode().strip().splitlines()
  name = signal.Signals(signum).name
  assert process.returncode == 130 and len(lines) == 1 and lines[0].startswith(f"stopped: {name}")


def test_a_byte_order_mark_is_not_translated(trained, tmp_path, capsys, caplog):
  plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
  plain.write_text("A dog runs.\nTwo men talk.\n", encoding="utf-8")
  marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
  outputs = []
  for path in (plain, marked):
    argv = ["--workdir", str(trained), "--file", str(path)]
    assert run_cli(lambda argv=argv: translate_command.main(argv)) == 0
    outputs.append(capsys.readouterr().out)
  assert outputs[0] == outputs[1] and "outside the vocabulary" not in caplog.text


@pytest.mark.parametrize(
  "platform, cause",
  [("tpu", "Unable to initialize backend 'tpu'"), ("cuda", "JAX found no cuda device")],
)
def test_a_platform_the_machine_lacks_is_one_line(platform, cause, trained):
  result = command(
    "-m",
    "transformer.translate",
    "--workdir",
    str(trained),
    "A dog.",
    env_extra={"JAX_PLATFORMS": platform},
  )
  lines = result.stderr.decode().strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, lines[-5:]
  assert lines[0].startswith(f"error: {cause}")
  assert lines[0].endswith(
    f"JAX_PLATFORMS={platform} names a platform this machine does not "
    "have: unset it (JAX then takes what the machine has), or set it to "
    "one it has (cpu is always there)"
  )


def test_a_workdir_whose_name_is_not_utf8(trained, tmp_path, capsys):
  """A folder named with a byte that is not UTF-8 (kept by Python as a surrogate): SentencePiece
  could not open the tokenizer by that path (TypeError), and model.json and the scores could
  not be written (UnicodeEncodeError)."""
  from transformer import evaluate
  from transformer.runs.artifact import read_model

  workdir = tmp_path / os.fsdecode(b"run\xff")
  shutil.copytree(trained, workdir)
  src, ref = (
    write_lines(tmp_path / "src", ["A dog runs."]),
    write_lines(tmp_path / "ref", ["Hund."]),
  )
  argv = ["--workdir", str(workdir), "--src", str(src), "--ref", str(ref), "--export"]
  assert run_cli(lambda: evaluate.main(argv)) == 0, capsys.readouterr().err
  _, _, _, meta = read_model(workdir)
  assert meta["source"] == str(workdir / "model")
  (scores,) = (workdir / "evaluations").glob("*.json")
  assert json.loads(scores.read_text(encoding="utf-8"))["model"] == str(workdir / "model")
  assert run_cli(lambda: translate_command.main(["--workdir", str(workdir), "A dog."])) == 0


def test_a_cache_folder_that_cannot_be_used_is_named(trained, tmp_path):
  """TRANSFORMER_CACHE_DIR naming a file is one line naming the variable; a fresh one is made,
  and preparing Multi30k in it prints nothing where evaluate's output goes."""
  afile = tmp_path / "afile"
  afile.write_text("")
  split = ("-m", "transformer.evaluate", "--workdir", str(trained), "--split", "validation[:4]")
  result = command(
    *split, "--out", str(tmp_path / "e1"), env_extra={"TRANSFORMER_CACHE_DIR": str(afile)}
  )
  lines = result.stderr.decode().strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, lines[-5:]
  assert lines[0].startswith(f"error: TRANSFORMER_CACHE_DIR={afile} cannot hold the cache (")
  fresh = tmp_path / "new" / "cache"
  result = command(
    *split, "--out", str(tmp_path / "e2"), env_extra={"TRANSFORMER_CACHE_DIR": str(fresh)}
  )
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  assert b"Downloading" not in result.stdout and b"prepared" not in result.stdout
  assert b"dataset_info.json" not in result.stderr  # tfds's warning about its own fresh folder
  assert (fresh / "tfds").is_dir()


def test_a_ctrl_c_dropped_during_the_set_up_stops_before_the_first_step(tmp_path, capsys):
  """A Ctrl-C whose raise Python dropped before training began (while the tokenizer and the
  token cache are built, JAX's garbage-collection callbacks run) stops the run before its first
  step, with its one line, instead of after the whole run."""

  def main():
    holder = type("Holder", (), {})()
    weakref.finalize(holder, os.kill, os.getpid(), signal.SIGINT)
    del holder  # the raise lands in the finalizer and is dropped
    run(smoke.get_config(), tmp_path / "run")

  assert run_cli(main) == 130
  assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped by an interrupt"
  assert (tmp_path / "run" / "spm.model").exists()  # the set-up ran
  checkpoints = tmp_path / "run" / "checkpoints"
  assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())
  assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_whose_raise_python_dropped_still_stops_with_one_line(capsys, monkeypatch, signum):
  """A SIGTERM or Ctrl-C that lands in a weakref finalizer or a garbage-collection callback (JAX
  runs both) raises there, and Python drops the exception, printing it with its traceback
  (through `sys.unraisablehook`): `check_stopped` between a command's steps raises it again, and
  only the one line is said."""
  printed = []
  monkeypatch.setattr(sys, "unraisablehook", printed.append)

  def main():
    holder = type("Holder", (), {})()
    weakref.finalize(holder, os.kill, os.getpid(), signum)
    del holder  # the finalizer runs, the handler raises inside it, Python drops the raise
    check_stopped()
    raise AssertionError("went on after the signal")

  assert run_cli(main) == 130
  assert capsys.readouterr().err.strip().splitlines() == [
    "stopped: SIGTERM; nothing was left half-written (every file is written whole or not at all)"
    if signum == signal.SIGTERM
    else "stopped by an interrupt"
  ]
  assert printed == []
  check_stopped()  # what stopped that command does not stop the next one in this process


def test_a_signal_after_a_command_is_done_is_ignored():
  """The work is done and delivered: a signal in the interpreter's teardown changes nothing
  (a Ctrl-C there printed `Exception ignored in ...`, a SIGTERM ended it with 143)."""
  script = (
    "import os, signal, sys\n"
    "from transformer.cli import run_cli\n"
    "code = run_cli(lambda: print('done'), command=True)\n"
    "for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
    "  os.kill(os.getpid(), signum)\n"
    "sys.exit(code)\n"
  )
  result = command("-c", script)
  assert (result.returncode, result.stdout, result.stderr) == (0, b"done\n", b"")
