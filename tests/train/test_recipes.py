"""The shipped recipes: each is a valid configuration, and the GPU recipe's machinery (packing,
an average of its last 10 checkpoints, beam 5) runs end to end on a slice of Multi30k."""

import importlib.util
import json

import pytest

from benchmarks.time_to_bleu import run_curve
from transformer.cli import recipe_names, recipe_path
from transformer.config import Config
from transformer.data.config import FILE_DATASETS
from transformer.errors import UserError
from transformer.train.loop import run


def recipe(name: str):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", recipe_path(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_is_a_valid_config(name):
  raw = recipe(name)
  if raw.data.dataset in FILE_DATASETS and not raw.data.train_files:
    # The user's text comes on the command line; without it the one-line error asks for it.
    with pytest.raises(UserError, match=r"data\.train_files"):
      Config.of(raw)
    raw.data.train_files = ("input.txt",)
  config = Config.of(raw)
  if config.data.vocab_size:  # 0: the tokenizer's own size, set once the tokenizer exists
    assert config.model.vocab_size == config.data.vocab_size
  assert config.num_train_steps > 0


def test_the_gpu_recipe_is_the_literatures_small_transformer():
  """Wu et al. (2021): 4+4 layers, d_model 128, 4 heads, d_ff 256, dropout 0.3, peak learning
  rate 5e-3, the last 10 checkpoints averaged, beam 5."""
  config = Config.of(recipe("multi30k_gpu"))
  model = config.model
  assert (model.num_encoder_layers, model.num_decoder_layers) == (4, 4)
  assert (model.d_model, model.num_heads, model.d_ff, model.dropout_rate) == (128, 4, 256, 0.3)
  opt = config.optimizer
  peak = opt.lr_scale * model.d_model**-0.5 * opt.warmup_steps**-0.5
  assert peak == pytest.approx(5e-3, rel=0.01)
  assert config.average_last_checkpoints == 10 and config.decode.beam_size == 5


@pytest.mark.slow
def test_the_gpu_recipe_trains_averages_and_translates_on_a_slice(tmp_path):
  config = recipe("multi30k_gpu")
  config.model.update(dtype="float32", num_encoder_layers=1, num_decoder_layers=1)
  config.data.update(
    train_split="train[:600]",
    eval_split="validation[:32]",
    test_splits=("test_2016[:16]",),
    vocab_size=400,
    tokens_per_batch=512,
  )
  config.optimizer.warmup_steps = 5
  config.update(num_train_steps=10, checkpoint_every_steps=1, eval_every_steps=5)
  results = run(config, tmp_path)
  assert results["step"] == 10
  model = json.loads((tmp_path / "model" / "model.json").read_text())
  assert model["averaged_steps"] == list(range(1, 11))
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "eval/bleu_greedy" in r] == [5, 10]
  curve = run_curve(tmp_path)  # the run's BLEU against time, from its workdir alone
  assert [p["step"] for p in curve["points"]] == [5, 10]
  assert 0 < curve["points"][0]["elapsed_s"] < curve["points"][1]["elapsed_s"]
  assert curve["test_bleu"]["test_2016[:16]"] == results["bleu/test_2016[:16]"]
  assert len((tmp_path / "translations" / "test_2016[:16].txt").read_text().splitlines()) == 16
