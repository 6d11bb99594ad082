"""After training: the model that was scored is the model the commands use.

One smoke run with checkpoint averaging is trained once for the module; `evaluate` must
reproduce the BLEU training printed, `translate` the hypotheses training wrote.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transformer import evaluate as evaluate_command
from transformer import translate as translate_command
from transformer.cli import run_cli
from transformer.configs import smoke
from transformer.data.multi30k import DEFAULT_SOURCE_DIR
from transformer.runs.artifact import read_model
from transformer.train.loop import run

pytestmark = pytest.mark.slow  # a training run shared by the module, commands in subprocesses

ROOT = Path(__file__).resolve().parents[2]
SPLIT = "test_2016[:24]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, results) of a smoke run averaging its last two checkpoints (steps 3 and 6)."""
  workdir = tmp_path_factory.mktemp("trained")
  config = smoke.get_config()
  config.average_last_checkpoints = 2
  return workdir, run(config, workdir)


def sources(count: int) -> list[str]:
  with gzip.open(DEFAULT_SOURCE_DIR / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
    return [next(f).rstrip("\n") for _ in range(count)]


def command(*args, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", *args],
    input=stdin,
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=600,
  )


def test_training_exports_the_averaged_model_it_scored(trained):
  workdir, results = trained
  spec, params, tokenizer, meta = read_model(workdir)
  assert meta["step"] == 6 and meta["averaged_steps"] == [3, 6]
  assert "decoder/layers/0/cross_attention/query" in params
  assert spec.model.d_model == 32 and tokenizer.read_bytes() == (workdir / "spm.model").read_bytes()
  assert f"bleu/{SPLIT}" in results
  # model.json carries the scores of the model it describes, and the search they were made with.
  assert meta["scores"][SPLIT]["bleu"] == results[f"bleu/{SPLIT}"]
  assert meta["scores"]["validation"]["loss"] == results["eval/loss"]
  assert meta["decode"] == {
    "beam_size": 2,
    "alpha": 0.6,
    "max_extra_tokens": 8,
    "stop": "heuristic",
  }


def test_evaluate_reproduces_the_bleu_training_printed(trained, tmp_path, capsys):
  workdir, results = trained
  report = evaluate_command.main(
    ["--workdir", str(workdir), "--split", SPLIT, "--out", str(tmp_path)]
  )
  assert report[SPLIT]["bleu"] == results[f"bleu/{SPLIT}"]
  hypotheses = (tmp_path / f"{SPLIT}.model.beam2.alpha0.6.txt").read_text().splitlines()
  assert hypotheses == (workdir / "translations" / f"{SPLIT}.txt").read_text().splitlines()
  scores = json.loads((tmp_path / f"{SPLIT}.model.beam2.alpha0.6.json").read_text())
  assert scores["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
  assert {"chrf", "bleu_lowercased"} <= scores.keys()
  assert f"{SPLIT}: BLEU = " in capsys.readouterr().out
  # The exact stop rule, asked for by name, is scored into files of its own.
  exact = evaluate_command.main(
    ["--workdir", str(workdir), "--split", SPLIT, "--out", str(tmp_path), "--stop", "exact"]
  )
  assert exact[SPLIT]["stop"] == "exact" and report[SPLIT]["stop"] == "heuristic"
  exact_file = tmp_path / f"{SPLIT}.model.beam2.alpha0.6.exact.txt"
  assert len(exact_file.read_text().splitlines()) == len(hypotheses)


def test_translate_prints_the_hypotheses_training_wrote(trained):
  workdir, _ = trained
  lines = sources(24)
  result = command(
    "transformer.translate",
    "--workdir",
    str(workdir),
    "--beam_size",
    "2",
    "--max_extra_tokens",
    "8",
    stdin="\n".join(lines) + "\n",
  )
  assert result.returncode == 0, result.stderr
  want = (workdir / "translations" / f"{SPLIT}.txt").read_text().splitlines()
  assert result.stdout.splitlines() == want


def test_translate_streams_blank_lines_through_and_is_quiet(trained):
  workdir, _ = trained
  result = command(
    "transformer.translate", "--workdir", str(workdir), stdin="A dog runs.\n\nTwo men talk.\n"
  )
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  # Three lines, the second blank; the others the sentences' own translations (which a model
  # trained for six steps may leave empty).
  assert result.stdout.count("\n") == 3 and result.stdout.endswith("\n")
  lines = result.stdout.split("\n")[:3]
  want = translate_command.Translator(workdir).translate(["A dog runs.", "", "Two men talk."])
  assert lines == want and lines[1] == ""


@pytest.mark.parametrize(
  "case, message",
  [
    ("no_model", "no exported model in"),
    ("bad_step", "--step 5: "),
    ("edited_config", "model.json does not match its own checksum"),
    ("damaged_params", "does not match the checksum"),
  ],
)
def test_loading_errors_are_one_line_and_exit_2(case, message, trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  args = ["--workdir", str(workdir), "A dog runs."]
  if case == "no_model":
    shutil.rmtree(workdir / "model")
  elif case == "bad_step":
    args += ["--step", "5"]
  elif case == "edited_config":  # a hand-edited model.json no longer describes the parameters
    meta_path = workdir / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["d_ff"] = 128
    meta_path.write_text(json.dumps(meta))
  else:
    params = workdir / "model" / "params.safetensors"
    data = bytearray(params.read_bytes())
    data[-100] ^= 0xFF
    params.write_bytes(bytes(data))
  assert run_cli(lambda: translate_command.main(args)) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors


def test_a_checkpoint_or_an_average_can_be_picked(trained, capsys):
  workdir, _ = trained
  translate_command.main(["--workdir", str(workdir), "--step", "3", "A dog runs."])
  translate_command.main(["--workdir", str(workdir), "--average", "2", "A dog runs."])
  _, averaged = capsys.readouterr().out.splitlines()
  model = translate_command.Translator(workdir).translate(["A dog runs."])  # the run's search
  assert averaged == model[0]  # the export is that average


def test_a_regular_install_trains_and_translates_from_another_folder(tmp_path):
  """A wheel of the package installed (not editable) into a fresh environment whose dependencies
  are this one's; its console commands then run from an unrelated folder, with the recipes and
  the corpus the wheel carries."""
  wheels = tmp_path / "wheels"
  build = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert build.returncode == 0, build.stderr[-2000:]
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  site = next((venv / "lib").glob("python*/site-packages"))
  outer = [p for p in sys.path if p.endswith("site-packages")]
  (site / "outer.pth").write_text("\n".join(outer) + "\n")  # dependencies, not this package
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  install = subprocess.run(
    [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", *wheels.glob("*.whl")],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert install.returncode == 0, install.stderr[-2000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  where = subprocess.run(
    [venv / "bin" / "python", "-c", "import transformer; print(transformer.__file__)"],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
  )
  assert str(site) in where.stdout, where.stdout + where.stderr
  train = subprocess.run(
    [
      venv / "bin" / "transformer-train",
      "--config",
      "smoke",
      "--workdir",
      "run",
      "--config.num_train_steps=2",
      "--config.decode.bleu_at_end=False",
    ],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
    timeout=600,
  )
  assert train.returncode == 0, train.stderr[-3000:]
  translate = subprocess.run(
    [venv / "bin" / "transformer-translate", "--workdir", "run", "A dog runs."],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
    timeout=600,
  )
  assert translate.returncode == 0, translate.stderr
  assert len(translate.stdout.splitlines()) == 1
