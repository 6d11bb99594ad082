"""A run written by an earlier version (tests/fixtures/run_v0_1) still resumes and translates."""

import json
import shutil
from pathlib import Path

import pytest

from transformer.config import Config
from transformer.configs import smoke
from transformer.runs.translator import Translator
from transformer.train.loop import run

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_v0_1"


@pytest.fixture
def old_run(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(FIXTURE, workdir)
  return workdir


def old_config(steps: int):
  """The fixture's own config.json, as a run resumes with it, for `steps` updates."""
  values = json.loads((FIXTURE / "config.json").read_text())
  values["num_train_steps"] = steps
  return Config.from_dict(values)


def test_its_config_json_is_read_by_the_new_schema():
  config = old_config(2)
  assert config.model.vocab_size == config.data.vocab_size == 120
  assert config.model.d_model == 16 and config.data.length_buckets == (32,)
  model = config.to_dict()["model"]
  saved = json.loads((FIXTURE / "config.json").read_text())["model"]
  assert {key: model[key] for key in saved} == saved
  # Keys added since then read as the values that reproduce the old run.
  assert {key: model[key] for key in model.keys() - saved.keys()} == {
    "dropout_rng": "threefry2x32",
    "scan_layers": False,
    "use_bias": True,
  }


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint(old_run):
  results = run(old_config(3), old_run)
  assert results["step"] == 3
  logged = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged if "train/loss" in m] == [3]  # steps 1-2 were not redone


def test_its_checkpoint_translates(old_run):
  translator = Translator(old_run, step=2)  # it predates the exported model
  assert translator.spec.model.d_model == 16
  assert len(translator.translate(["A dog runs.", "Two men talk."], beam_size=2)) == 2


def test_smoke_recipe_is_still_compatible_with_it():
  """The fixture was trained with the smoke recipe's data settings."""
  recipe = Config.of(smoke.get_config())
  config = old_config(2)
  assert (recipe.data.train_split, recipe.data.max_len) == (
    config.data.train_split,
    config.data.max_len,
  )
