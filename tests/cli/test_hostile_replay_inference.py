"""Hostile use of the inference commands (translate, evaluate, visualize, sample) and of the
Python API: each case a tester found that ended in a traceback, after the work, or differently
than asked. Runs are tiny untrained models saved as training leaves them (`write_run`)."""

import functools
import logging
import tomllib
from pathlib import Path

import jax
import pytest

from tests import helpers
from transformer import compilation_cache, startup
from transformer import evaluate as evaluate_command
from transformer import translate as translate_command
from transformer import visualize as visualize_command
from transformer.errors import UserError
from transformer.runs.translator import Translator

ROOT = Path(__file__).resolve().parents[2]

one_line_error = functools.partial(helpers.one_line_error, quiet_stdout=True)


# ------------------------------------------------------------------------------------------------
# 1. A program of one's own named like a command keeps its signal handling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "script", ["transformer-demo.py", "/home/me/transformer-experiments", "transformer-train.py"]
)
def test_a_script_named_like_a_command_is_not_one(script):
  """`python transformer-demo.py` (importing the package) had its Ctrl-C turned into
  `stopped: SIGINT while the command was starting` and exit 130 for its whole life, its own
  KeyboardInterrupt handling never run: any script whose name began `transformer-` counted."""
  assert startup.is_command(["python", script]) is False


def test_the_installed_commands_are_commands():
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  assert set(startup._COMMAND_SCRIPTS) == set(scripts)
  for name in scripts:
    assert startup.is_command(["/venv/bin/python", f"/venv/bin/{name}", "--workdir", "x"])


# ------------------------------------------------------------------------------------------------
# 2. The exported model folder given as --workdir
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slash", ["", "/"])
def test_the_model_folder_as_workdir_names_the_run_above_it(slash, translation_run, capsys):
  """Said `no exported model in RUN/model/model: train the run to its end ...`."""
  model_dir = f"{translation_run / 'model'}{slash}"
  line = one_line_error(capsys, lambda: translate_command.main(["--workdir", model_dir, "a man"]))
  assert line == (
    f"error: {translation_run / 'model'} is an exported model folder, not a run directory: "
    f"give the run directory that holds it, --workdir {translation_run}"
  )


# ------------------------------------------------------------------------------------------------
# 3. visualize --out that cannot be a folder, refused before the work
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("under", ["", "/sub"])
def test_visualize_out_that_is_a_file(under, translation_run, tmp_path, capsys, monkeypatch):
  """Translated and printed the sentence first, then failed with `File exists: check the path
  (a writable directory for --workdir ...)`."""
  (tmp_path / "file").write_text("")
  out = f"{tmp_path / 'file'}{under}"
  monkeypatch.setattr(visualize_command, "load_translator", lambda *a, **k: pytest.fail("loaded"))
  argv = ["--workdir", str(translation_run), "--out", out, "a man"]
  line = one_line_error(capsys, lambda: visualize_command.main(argv))
  assert line.startswith(f"error: --out {out} ") and "give a folder for the figures" in line
  assert ("is a file" if not under else f"lies under {tmp_path / 'file'}, which is a file") in line


def test_visualize_default_out_of_a_workdir_that_is_a_file(tmp_path, capsys):
  """The default --out (WORKDIR/attention) is not blamed for a --workdir that is a file."""
  (tmp_path / "file").write_text("")
  argv = ["--workdir", str(tmp_path / "file"), "a man"]
  line = one_line_error(capsys, lambda: visualize_command.main(argv))
  assert "is not a directory: --workdir must be a run directory" in line


# ------------------------------------------------------------------------------------------------
# 4. JAX's 64-bit mode
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)


X64_MESSAGE = "error: JAX's 64-bit mode is on (JAX_ENABLE_X64 or jax_enable_x64)"


def test_translate_under_64_bit_mode_is_one_line(x64, translation_run, capsys):
  """JAX_ENABLE_X64=1 ended translate with a 20-line TypeError out of the beam search's loop
  (float32 scores in, float64 out)."""
  line = one_line_error(
    capsys, lambda: translate_command.main(["--workdir", str(translation_run), "a man"])
  )
  assert line.startswith(X64_MESSAGE) and "unset JAX_ENABLE_X64" in line


def test_evaluate_under_64_bit_mode_is_one_line(x64, translation_run, tmp_path, capsys):
  src = tmp_path / "s.en"
  src.write_text("a man\n")
  argv = ["--workdir", str(translation_run), "--src", str(src), "--ref", str(src)]
  line = one_line_error(capsys, lambda: evaluate_command.main([*argv, "--out", str(tmp_path)]))
  assert line.startswith(X64_MESSAGE)


def test_the_api_under_64_bit_mode_is_a_user_error(x64, translation_run):
  with pytest.raises(UserError, match="64-bit mode is on"):
    Translator(translation_run)


# ------------------------------------------------------------------------------------------------
# 5. JAX_COMPILATION_CACHE_DIR naming a folder that cannot be one
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_dir_setting():
  before = jax.config.jax_compilation_cache_dir
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_a_compilation_cache_dir_that_cannot_be_a_folder(
  where, cache_dir_setting, tmp_path, caplog
):
  """Translated, with JAX's two-line UserWarning of a failed cache read on the way (the folder
  was left to JAX as named); now one warning naming it, and the cache off."""
  (tmp_path / "file").write_text("")
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / where))
  with caplog.at_level(logging.WARNING):
    assert compilation_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None
  assert f"no compilation cache in {tmp_path / where}" in caplog.text


def test_a_compilation_cache_dir_named_by_the_user_is_made(cache_dir_setting, tmp_path):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "a" / "b"))
  assert compilation_cache.enable() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()


# ------------------------------------------------------------------------------------------------
# 6. An --out inside the folders the run manages (model/, checkpoints/)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["checkpoints", "model", "model/scores"])
def test_evaluate_out_inside_model_or_checkpoints(inside, translation_run, tmp_path, capsys):
  """Wrote its hypotheses there: every later --step/--average load then warned of them in
  checkpoints/, and the next `evaluate --export` deleted them with model/."""
  src = tmp_path / "s.en"
  src.write_text("a man\n")
  out = translation_run / inside
  argv = ["--workdir", str(translation_run), "--src", str(src), "--ref", str(src)]
  line = one_line_error(capsys, lambda: evaluate_command.main([*argv, "--out", str(out)]))
  top = translation_run / inside.split("/")[0]
  assert line.startswith(f"error: --out {out} lies in {top}, which the run manages as a whole")
  assert line.endswith(f"e.g. {translation_run / 'evaluations'}")
  assert sorted(p.name for p in (translation_run / "checkpoints").iterdir()) == ["1"]
  assert not (translation_run / "model" / "scores").exists()


def test_visualize_out_inside_checkpoints(translation_run, capsys, monkeypatch):
  monkeypatch.setattr(visualize_command, "load_translator", lambda *a, **k: pytest.fail("loaded"))
  out = translation_run / "checkpoints" / "figures"
  argv = ["--workdir", str(translation_run), "--out", str(out), "a man"]
  line = one_line_error(capsys, lambda: visualize_command.main(argv))
  assert f"lies in {translation_run / 'checkpoints'}, which the run manages" in line
  assert line.endswith(f"e.g. {translation_run / 'attention'}")


# ------------------------------------------------------------------------------------------------
# 7. translate given sentences and --file
# ------------------------------------------------------------------------------------------------


def test_translate_sentences_and_a_file_together(translation_run, tmp_path, capsys):
  """Translated the arguments and ignored the file without a word."""
  path = tmp_path / "s.en"
  path.write_text("a man\na woman\n")
  argv = ["--workdir", str(translation_run), "--file", str(path), "a dog"]
  line = one_line_error(capsys, lambda: translate_command.main(argv))
  assert line == (
    "error: give sentences as arguments or --file, not both (see python -m "
    "transformer.translate --help)"
  )


# ------------------------------------------------------------------------------------------------
# 8. evaluate --src and --ref naming one file
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "link"])
def test_evaluate_src_and_ref_of_one_file(how, translation_run, tmp_path, capsys):
  """Scored the sources against themselves (as `--src /dev/stdin --ref /dev/stdin < file`
  does): a BLEU of no meaning, printed and written as any other."""
  src = tmp_path / "s.en"
  src.write_text("a man\na woman\n")
  ref = src
  if how == "link":
    ref = tmp_path / "r.de"
    ref.hardlink_to(src)
  argv = ["--workdir", str(translation_run), "--src", str(src), "--ref", str(ref)]
  line = one_line_error(capsys, lambda: evaluate_command.main([*argv, "--out", str(tmp_path)]))
  assert line.startswith(f"error: --src {src} and --ref {ref} are the same file")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    ["s.en", *(["r.de"] * (how == "link"))]
  )
