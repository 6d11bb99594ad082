"""Exports and evaluations that must not damage what they write over: `transformer.export`'s
--out (never the run's own files, whole or not at all, a full disk named as --out's) and
`transformer.evaluate`'s --export (model.json keeps the step, the averaged checkpoints and the
scores of the parameters it holds), --out and --split checked before any work.

The run is a tiny random model written as training leaves one (conftest's `write_run`), with
three checkpoints of distinct parameters: no training, so every test here is quick.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from tests.helpers import one_line_error
from transformer import EncoderDecoder, TransformerConfig
from transformer import evaluate as evaluate_command
from transformer import export as export_command
from transformer.cli import run_cli
from transformer.runs.artifact import read_meta
from transformer.runs.checkpoint import Checkpointer, Record

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, write_run) -> Path:
  """A translation run: config.json, spm.model, model/ of step 1, and checkpoints 1, 2 and 3
  whose parameters differ (each step's are the last ones scaled)."""
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=32)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  model.eval()
  workdir = write_run(
    tmp_path_factory.mktemp("run"), model, tokenizer, task="translation", data_max_length=32
  )
  checkpointer = Checkpointer(workdir / "checkpoints", asynchronous=False)
  for step in (2, 3):
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda value: value * 1.01, params))
    checkpointer.save(step, {"params": nnx.state(model, nnx.Param)}, Record({}))
  checkpointer.close()
  return workdir


@pytest.fixture
def workdir(run_dir, tmp_path) -> Path:
  """A copy of the run that a test may change."""
  return Path(shutil.copytree(run_dir, tmp_path / "run"))


def contents(folder: Path) -> dict[str, bytes]:
  """Every file under `folder` by its relative path: what a test compares before and after."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------
# export --out: never the run's own files
# ------------------------------------------------------------------------------------------------


def test_export_refuses_the_workdir_as_out(workdir, capsys):
  """--out WORKDIR overwrote config.json with the MarianMT config: the run could not resume."""
  before = contents(workdir)
  argv = ["--workdir", str(workdir), "--format", "huggingface", "--out", str(workdir)]
  line = one_line_error(capsys, lambda: export_command.main(argv))
  assert f"--out {workdir} is the run's workdir" in line
  assert contents(workdir) == before


@pytest.mark.parametrize(
  "inside, message",
  [
    ("model", "holds files that are not a huggingface export of this package"),
    ("checkpoints/1", "lies inside {workdir}/checkpoints, which the run keeps"),
    ("model/hf", "lies inside {workdir}/model, which the run keeps"),
    ("config.json/hf", "lies inside {workdir}/config.json, which the run keeps"),
  ],
)
def test_export_refuses_an_out_inside_what_the_run_keeps(inside, message, workdir, capsys):
  before = contents(workdir)
  out = workdir / inside
  argv = ["--workdir", str(workdir), "--format", "huggingface", "--out", str(out)]
  line = one_line_error(capsys, lambda: export_command.main(argv))
  assert f"--out {out} {message.format(workdir=workdir)}" in line
  assert contents(workdir) == before


def test_export_refuses_a_folder_of_other_files(workdir, tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  argv = ["--workdir", str(workdir), "--format", "huggingface", "--out", str(out)]
  line = one_line_error(capsys, lambda: export_command.main(argv))
  assert "holds files that are not a huggingface export of this package (notes.txt" in line
  assert contents(out) == {"notes.txt": b"keep me"}


@pytest.mark.parametrize("under", ["", "/hf"])
def test_export_refuses_an_out_that_is_a_file(under, workdir, tmp_path, capsys):
  (tmp_path / "file").write_text("mine")
  out = f"{tmp_path / 'file'}{under}"
  argv = ["--workdir", str(workdir), "--format", "huggingface", "--out", out]
  line = one_line_error(capsys, lambda: export_command.main(argv))
  where = "is a file" if not under else f"lies under {tmp_path / 'file'}, which is a file"
  assert line.startswith(f"error: --out {out} {where}: give a folder")
  assert (tmp_path / "file").read_text() == "mine"


def test_export_replaces_its_own_previous_export_only(workdir, tmp_path, capsys):
  """A previous export of the same format is replaced (the new one equals a fresh export); one
  of another format, or one with a file added, is refused."""
  out, fresh = tmp_path / "hf", tmp_path / "fresh"
  export_command.export(workdir, "huggingface", out, step=1)
  export_command.export(workdir, "huggingface", out, step=3)  # replaced
  export_command.export(workdir, "huggingface", fresh, step=3)
  assert contents(out) == contents(fresh)
  marker = json.loads((out / "transformer-export.json").read_text())
  assert marker["format"] == "huggingface"
  assert set(marker["files"]) | {"transformer-export.json"} == set(contents(out))
  argv = ["--workdir", str(workdir), "--format", "ctranslate2", "--out", str(out)]
  assert "not a ctranslate2 export" in one_line_error(capsys, lambda: export_command.main(argv))
  (out / "README.md").write_text("my notes")
  argv = ["--workdir", str(workdir), "--format", "huggingface", "--out", str(out)]
  assert "not a huggingface export" in one_line_error(capsys, lambda: export_command.main(argv))
  assert (out / "README.md").read_text() == "my notes"


def test_export_inside_the_workdir_in_a_folder_of_its_own(workdir):
  """WORKDIR/huggingface is not the run's: allowed, and the run's files are untouched."""
  before = contents(workdir)
  out = export_command.export(workdir, "huggingface", workdir / "huggingface")
  assert contents(workdir) == before | {f"huggingface/{k}": v for k, v in contents(out).items()}


# ------------------------------------------------------------------------------------------------
# export on a full disk: whole or not at all, the message names --out
# ------------------------------------------------------------------------------------------------


# The export command with writes past a size failing: RLIMIT_FSIZE fails them with EFBIG, as a
# full disk fails them with ENOSPC (Python ignores the SIGXFSZ). Set by the child itself: a
# `preexec_fn` would run Python in a fork of this multithreaded process.
LIMITED_EXPORT = """
import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
runpy.run_module("transformer.export", run_name="__main__", alter_sys=True)
"""


def limited_export(workdir: Path, out: Path, limit: int) -> subprocess.CompletedProcess:
  argv = ["--workdir", str(workdir), "--format", "huggingface", "--out", str(out)]
  return subprocess.run(
    [sys.executable, "-c", LIMITED_EXPORT, str(limit), *argv],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_a_full_disk_leaves_no_half_export_and_names_out(workdir, tmp_path):
  """Left a truncated source.spm and missing files in --out, and advised freeing space under
  --workdir; a previous export there must survive whole."""
  out = tmp_path / "disk" / "hf"
  failed = limited_export(workdir, out, 20_000)
  lines = failed.stderr.strip().splitlines()
  assert failed.returncode == 2 and len(lines) == 1, failed.stderr[-2000:]
  assert lines[0] == (
    f"error: --out {out} cannot be written (a file would exceed the file-size limit): free "
    "space there or give another --out; nothing was written"
  )
  assert list(out.parent.iterdir()) == []  # neither --out nor a temporary folder
  before = contents(export_command.export(workdir, "huggingface", out))
  again = limited_export(workdir, out, 20_000)
  assert again.returncode == 2 and "--out" in again.stderr
  assert contents(out) == before
  assert [p.name for p in out.parent.iterdir()] == ["hf"]


# ------------------------------------------------------------------------------------------------
# evaluate --export: model.json says what it holds
# ------------------------------------------------------------------------------------------------


def evaluate(workdir: Path, tmp_path: Path, *args: str) -> dict:
  """evaluate --export on two sentences; returns the new model.json."""
  src, ref = tmp_path / "s.en", tmp_path / "r.de"
  src.write_text("A dog runs.\nTwo men talk.\n", encoding="utf-8")
  ref.write_text("Ein Hund läuft.\nZwei Männer reden.\n", encoding="utf-8")
  argv = ["--workdir", str(workdir), "--src", str(src), "--ref", str(ref), *args, "--export"]
  argv += ["--out", str(tmp_path / "evaluations")]
  assert run_cli(lambda: evaluate_command.main(argv)) == 0
  return read_meta(workdir / "model" / "model.json")


def score_of(tmp_path: Path, tag: str) -> dict:
  """The scores evaluate wrote beside its hypotheses, as model.json keeps them."""
  (path,) = (tmp_path / "evaluations").glob(f"s.en.{tag}.*.json")
  scores = json.loads(path.read_text())
  return {k: scores[k] for k in RECORDED}


def with_scores(workdir: Path, scores: dict) -> dict:
  """Records `scores` in the run's model.json, as training's end does."""
  from transformer.runs.artifact import record_scores

  record_scores(workdir, scores)
  return read_meta(workdir / "model" / "model.json")


# What training's end records of a test set's scores in model.json (train/finish.py).
RECORDED = ("bleu", "bleu_lowercased", "chrf", "signature", "beam_size", "alpha")
TRAINING_SCORES = {"validation": {"loss": 4.5}, "test_2016": {"bleu": 1.5, "beam_size": 4}}


def test_evaluate_export_of_the_export_keeps_its_step_and_scores(workdir, tmp_path):
  """`step` became null and the recorded scores were dropped, the parameters unchanged."""
  before = with_scores(workdir, TRAINING_SCORES)
  after = evaluate(workdir, tmp_path)
  assert after["params_sha256"] == before["params_sha256"]
  assert (after["step"], after["averaged_steps"]) == (1, [])
  assert after["scores"] == {**TRAINING_SCORES, "s.en": score_of(tmp_path, "model")}


def test_evaluate_export_of_an_average_records_its_checkpoints(workdir, tmp_path):
  """`averaged_steps` was [] while `source` named the average of checkpoints [1, 2, 3]; the
  scores of the replaced (other) parameters must not be carried over."""
  with_scores(workdir, TRAINING_SCORES)
  after = evaluate(workdir, tmp_path, "--average", "3")
  assert (after["step"], after["averaged_steps"]) == (3, [1, 2, 3])
  assert after["source"].startswith("the average of checkpoints [1, 2, 3]")
  assert after["scores"] == {"s.en": score_of(tmp_path, "avg3")}


def test_evaluate_export_of_a_checkpoint(workdir, tmp_path):
  """Checkpoint 1 holds the exported parameters (their scores are kept); checkpoint 2 not."""
  with_scores(workdir, TRAINING_SCORES)
  same = evaluate(workdir, tmp_path, "--step", "1")
  assert (same["step"], same["averaged_steps"]) == (1, [])
  assert same["scores"] == {**TRAINING_SCORES, "s.en": score_of(tmp_path, "step1")}
  other = evaluate(workdir, tmp_path, "--step", "2")
  assert (other["step"], other["averaged_steps"]) == (2, [])
  assert other["scores"] == {"s.en": score_of(tmp_path, "step2")}


# ------------------------------------------------------------------------------------------------
# evaluate's arguments, checked before any work
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("under", ["", "/sub"])
def test_evaluate_out_that_is_a_file(under, run_dir, tmp_path, capsys, monkeypatch):
  """Translated everything first, then failed with advice about --workdir."""
  (tmp_path / "file").write_text("")
  out = f"{tmp_path / 'file'}{under}"
  src = tmp_path / "s.en"
  src.write_text("A dog.\n")
  monkeypatch.setattr(evaluate_command, "load_run", lambda *a, **k: pytest.fail("loaded"))
  argv = ["--workdir", str(run_dir), "--src", str(src), "--ref", str(src), "--out", out]
  line = one_line_error(capsys, lambda: evaluate_command.main(argv))
  assert line.startswith(f"error: --out {out} ")
  assert ("is a file" if not under else f"lies under {tmp_path / 'file'}, which is a file") in line


@pytest.mark.parametrize(
  "split, part",
  [
    ("validation[5:3]", "validation[5:3]"),
    ("test_2016[-2:-5]", "test_2016[-2:-5]"),
    ("test_2016[:10]+validation[60%:40%]", "test_2016[:10]+validation[60%:40%]"),
  ],
)
def test_evaluate_a_reversed_split_slice(split, part, run_dir, capsys):
  """tfds reads it as a split of negative length: a 27-line ValueError from the token cache."""
  argv = ["--workdir", str(run_dir), "--split", split]
  line = one_line_error(capsys, lambda: evaluate_command.main(argv))
  assert f"split {part!r} cannot be read (the slice selects no pairs)" in line
