"""Hostile input to the commands that sample and translate with a trained model: each case a
tester found. Runs are tiny untrained models saved as training leaves them (`write_run`), so
every test reads its expectation from an independent reference (SentencePiece itself, the
model's configuration), never from what the model happens to say."""

import functools
import logging
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import sentencepiece as spm

from tests import helpers
from transformer import evaluate as evaluate_command
from transformer import sample as sample_command
from transformer import translate as translate_command
from transformer import visualize as visualize_command
from transformer.config import MAX_SEED
from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.errors import UserError
from transformer.runs import translator as translator_module
from transformer.runs.translator import Translator

MAX_LEN = helpers.TINY_MAX_LEN
UNKNOWN = "🐶🐶東京"  # emoji and a script the tokenizer never saw: <unk> pieces


one_line_error = functools.partial(helpers.one_line_error, quiet_stdout=True)


@pytest.fixture
def drawn(monkeypatch):
  """The ids every call to `sample` returns, as they leave the model."""
  rows, real_sample = [], translator_module.sample

  def recording_sample(*args, **kwargs):
    out = real_sample(*args, **kwargs)
    rows.append([int(i) for i in np.asarray(out)[0]])
    return out

  monkeypatch.setattr(translator_module, "sample", recording_sample, raising=True)
  return rows


# ------------------------------------------------------------------------------------------------
# 1. A continuation keeps the space between the prompt and a new word
# ------------------------------------------------------------------------------------------------


def test_a_sample_reads_as_sentencepiece_decodes_the_whole_sequence(lm_run, tokenizer, drawn):
  """`Ein HundFußball`: the continuation was decoded alone, and SentencePiece drops the
  leading space of a text's first piece."""
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
  prompt = "a man with a red"
  prompt_ids = sp.encode(prompt)
  assert sp.decode(prompt_ids) == prompt
  samples = sample_command.main(
    ["--workdir", str(lm_run), "--prompt", prompt, "--num_samples", "8"]
    + ["--max_new_tokens", "4", "--temperature", "1.0"]
  )
  assert len(samples) == len(drawn) == 8
  starts_a_word = 0
  for text, row in zip(samples, drawn, strict=True):
    assert row[: len(prompt_ids) + 1] == [BOS_ID, *prompt_ids]
    new = row[len(prompt_ids) + 1 :]
    new = new[: new.index(EOS_ID)] if EOS_ID in new else new
    assert text == sp.decode(prompt_ids + new), (text, sp.id_to_piece(new))
    starts_a_word += bool(new) and sp.id_to_piece(new[0]).startswith("\u2581")
  assert starts_a_word > 0  # the case that lost its space was drawn


# ------------------------------------------------------------------------------------------------
# 2. translate refuses the flags of the other kind of run
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "flag, value",
  [("beam_size", "5"), ("alpha", "0.6"), ("stop", "exact"), ("max_extra_tokens", "3")],
)
def test_search_flags_for_a_language_model(flag, value, lm_run, capsys):
  line = one_line_error(
    capsys,
    lambda: translate_command.main(["--workdir", str(lm_run), f"--{flag}", value, "a man"]),
  )
  assert f"--{flag} is for translation runs" in line and "'lm' model" in line


@pytest.mark.parametrize(
  "flag, value",
  [
    ("temperature", "0.5"),
    ("top_k", "3"),
    ("top_p", "0.9"),
    ("seed", "1"),
    ("max_new_tokens", "5"),
  ],
)
def test_sampling_flags_for_a_translation_run(flag, value, translation_run, capsys):
  line = one_line_error(
    capsys,
    lambda: translate_command.main(
      ["--workdir", str(translation_run), f"--{flag}", value, "a man"]
    ),
  )
  assert f"--{flag} is for lm runs" in line and "'translation' model" in line


# ------------------------------------------------------------------------------------------------
# 3. A prompt of unknown pieces is noted, once
# ------------------------------------------------------------------------------------------------


def test_a_prompt_of_unknown_pieces_is_noted_once(lm_run, tokenizer, caplog, capsys):
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
  ids = sp.encode(UNKNOWN)
  unknown = ids.count(sp.unk_id())
  assert unknown > 0
  with caplog.at_level(logging.WARNING):
    sample_command.main(
      ["--workdir", str(lm_run), "--prompt", UNKNOWN, "--num_samples", "2"]
      + ["--max_new_tokens", "2"]
    )
  notes = [r.getMessage() for r in caplog.records if "outside the vocabulary" in r.getMessage()]
  want = (
    f"prompt 1: {unknown} of its {len(ids)} pieces are outside the vocabulary (<unk>); "
    "the model reads each as one unknown piece"
  )
  assert notes == [want]
  assert capsys.readouterr().out.count(UNKNOWN) == 2


# ------------------------------------------------------------------------------------------------
# 4. Beams past the model's positions: the limit is on --beam_size
# ------------------------------------------------------------------------------------------------


def test_a_beam_wider_than_the_positions(translation_run, tmp_path, capsys):
  """Beam search decodes a sentence's beams as one row of positions: max_len of them fit."""
  max_len = MAX_LEN
  wide = str(max_len + 1)
  (tmp_path / "s.en").write_text("a man\n")
  (tmp_path / "r.de").write_text("ein Mann\n")
  files = ["--src", str(tmp_path / "s.en"), "--ref", str(tmp_path / "r.de")]
  for main in (
    lambda: translate_command.main(["--workdir", str(translation_run), "--beam_size", wide, "a"]),
    lambda: evaluate_command.main(["--workdir", str(translation_run), *files, "--beam_size", wide]),
    lambda: visualize_command.main(
      ["--workdir", str(translation_run), "--out", str(tmp_path), "--beam_size", wide, "a"]
    ),
  ):
    line = one_line_error(capsys, main)
    assert f"--beam_size {wide} exceeds" in line and f"--beam_size {max_len} or less" in line
  translator = Translator(translation_run)
  with pytest.raises(UserError, match=f"--beam_size {wide} exceeds"):
    translator.translate(["a man"], beam_size=max_len + 1)
  assert len(translator.translate(["a man"], beam_size=max_len)) == 1  # the bound itself fits


# ------------------------------------------------------------------------------------------------
# 5. Seeds of every sample are checked before the first is printed
# ------------------------------------------------------------------------------------------------


def test_seeds_past_the_largest_count_on_from_zero(lm_run, capsys):
  """jax.random.key takes seeds up to 2^63 - 2 here; sample k is drawn with seed + k, which goes
  on from 0 past the largest, so any seed serves any number of samples, and a stream of lines
  read from stdin never fails half-way."""
  base = ["--workdir", str(lm_run), "--prompt", "a", "--max_new_tokens", "3", "--temperature", "5"]
  wrapped = sample_command.main([*base, "--seed", str(MAX_SEED), "--num_samples", "3"])
  counted = sample_command.main([*base, "--seed", "0", "--num_samples", "2"])
  last = sample_command.main([*base, "--seed", str(MAX_SEED), "--num_samples", "1"])
  assert wrapped == last + counted
  capsys.readouterr()
  line = one_line_error(capsys, lambda: sample_command.main([*base, "--seed", str(MAX_SEED + 1)]))
  assert f"--seed must be in [0, {MAX_SEED}]" in line


def test_translate_reads_any_number_of_lines_from_a_seed_at_the_top(
  lm_run, monkeypatch, capsys, tmp_path
):
  base = ["--workdir", str(lm_run), "--max_new_tokens", "3", "--temperature", "5"]

  def translated(*args: str, stdin: str = "") -> list[str]:
    (tmp_path / "stdin.txt").write_text(stdin, encoding="utf-8")
    with open(tmp_path / "stdin.txt", encoding="utf-8") as lines:
      monkeypatch.setattr(sys, "stdin", lines)
      translate_command.main([*base, *args])
    return capsys.readouterr().out.splitlines()

  streamed = translated("--seed", str(MAX_SEED - 1), stdin="a\na man\na\n")
  first = translated("--seed", str(MAX_SEED - 1), "a", "a man")
  rest = translated("--seed", "0", "a")
  assert streamed == first + rest and len(streamed) == 3


# ------------------------------------------------------------------------------------------------
# 6. The Python API with arguments of the wrong type
# ------------------------------------------------------------------------------------------------


# Run in a fresh interpreter, as a user's program runs: the tests' type-checking hook would
# refuse a float for an `int` parameter before the package's own check.
API_SCRIPT = """
import sys
import numpy as np
from transformer import Translator
workdir, method, *cases = sys.argv[1:]
call = getattr(Translator(workdir), method)
for options in cases:
  try:
    call(["a man"], **eval(f"dict({options})", {"np": np}))
    print("ok")
  except Exception as error:
    print(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}")
"""
TRANSLATE_CASES = [
  "beam_size=2.5",
  "beam_size=True",
  "beam_size='2'",
  "max_extra_tokens=3.7",
  "alpha='0.6'",
  "alpha=True",
  "first_line=1.0",
]
SAMPLING_CASES = [
  "top_k=2.5",
  "top_k=True",
  "max_new_tokens=2.5",
  "seed=1.5",
  "seed=False",
  "temperature='hot'",
  "top_p=True",
]
NUMPY_NUMBERS = "max_new_tokens=np.int64(2), top_k=np.int32(3), temperature=np.float32(0.5)"


def api_lines(workdir, method: str, cases: list[str]) -> dict[str, str]:
  """What each call of `method` with these keyword arguments ends with: "ok" or its error."""
  result = subprocess.run(
    [sys.executable, "-c", API_SCRIPT, str(workdir), method, *cases],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return dict(zip(cases, result.stdout.strip().splitlines(), strict=True))


@pytest.fixture(scope="module")
def translate_api(translation_run) -> dict[str, str]:
  return api_lines(translation_run, "translate", TRANSLATE_CASES)


@pytest.fixture(scope="module")
def sampling_api(lm_run) -> dict[str, str]:
  cases = [f"max_new_tokens=2, {case}" for case in SAMPLING_CASES if "max_new" not in case]
  cases += ["max_new_tokens=2.5", NUMPY_NUMBERS]
  return api_lines(lm_run, "continue_text", cases)


@pytest.mark.parametrize("case", TRANSLATE_CASES)
def test_translate_arguments_of_the_wrong_type(case, translate_api):
  name = case.split("=")[0]
  assert re.match(rf"UserError: {name} must be a (whole|real) number", translate_api[case]), (
    translate_api[case]
  )


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling_arguments_of_the_wrong_type(case, sampling_api):
  name = case.split("=")[0]
  line = sampling_api[case if "max_new" in case else f"max_new_tokens=2, {case}"]
  assert re.match(rf"UserError: {name} must be a (whole|real) number", line), line


def test_numpy_numbers_are_whole_and_real(sampling_api):
  assert sampling_api[NUMPY_NUMBERS] == "ok"


# ------------------------------------------------------------------------------------------------
# 7. visualize: unknown pieces noted once, matplotlib's missing glyphs quiet
# ------------------------------------------------------------------------------------------------


def test_visualize_notes_unknown_pieces_without_glyph_warnings(
  translation_run, tokenizer, tmp_path, caplog, capsys
):
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
  ids = sp.encode("🐶🐶🐶")
  with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    visualize_command.main(
      ["--workdir", str(translation_run), "--out", str(tmp_path), "--beam_size", "1", "🐶🐶🐶"]
    )
  assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
  notes = [r.getMessage() for r in caplog.records if "outside the vocabulary" in r.getMessage()]
  want = (
    f"the sentence: {ids.count(sp.unk_id())} of its {len(ids)} pieces are outside the "
    "vocabulary (<unk>); the translation will miss them"
  )
  assert notes == [want]
  assert (tmp_path / "overview.png").is_file()
  capsys.readouterr()


# ------------------------------------------------------------------------------------------------
# 8. An input line without an end is read only up to a cap
# ------------------------------------------------------------------------------------------------


MIB = 2**20


def test_an_endless_line_is_read_only_up_to_the_cap(tmp_path):
  """A line of a megabyte (~10^5 words, far past any model) is still read; one of 8 MiB without
  an end is refused by number, and the stream is not read to its end."""
  path = tmp_path / "input"
  path.write_bytes(b"a dog\n" + b"x" * MIB + b"\n" + b"\0" * (8 * MIB))
  with open(path, "rb") as stream:
    lines = translate_command.decoded_lines(stream, "stdin")
    assert next(lines) == "a dog" and next(lines) == "x" * MIB
    with pytest.raises(UserError, match=r"^stdin line 3 is longer than [\d,]+ bytes"):
      next(lines)
    assert stream.tell() < 6 * MIB


def test_translate_refuses_an_endless_stdin_line(translation_run, tmp_path, monkeypatch, capsys):
  path = tmp_path / "zeros"
  path.write_bytes(b"\0" * (8 * MIB))
  with open(path, encoding="utf-8") as endless:
    monkeypatch.setattr("sys.stdin", endless)
    line = one_line_error(
      capsys, lambda: translate_command.main(["--workdir", str(translation_run)])
    )
  assert "stdin line 1 is longer than" in line and "one sentence a line" in line
