"""model.scan_layers and model.dropout_rng through the training loop: resuming stays exact, the
export keeps per-layer names, and the dropout PRNG choices draw what they promise."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.steps import build_step, random_batch
from transformer import EncoderDecoder, TransformerConfig
from transformer.configs import smoke
from transformer.runs.artifact import read_model
from transformer.runs.loading import load_run
from transformer.runs.params import model_params
from transformer.train.loop import run
from transformer.train.step import dropout_key_as


def test_defaults_and_auto_resolve_by_compute_dtype():
  config = TransformerConfig.tiny(dtype="bfloat16")  # the defaults: float32 logits, threefry
  assert (config.resolved_logits_dtype, config.resolved_dropout_rng) == ("float32", "threefry2x32")
  auto = TransformerConfig.tiny(logits_dtype="auto", dropout_rng="auto")
  assert (auto.resolved_logits_dtype, auto.resolved_dropout_rng) == ("float32", "threefry2x32")
  bf16 = auto.replace(dtype="bfloat16")
  assert (bf16.resolved_logits_dtype, bf16.resolved_dropout_rng) == ("bfloat16", "rbg")
  fp16 = auto.replace(dtype="float16")
  assert (fp16.resolved_logits_dtype, fp16.resolved_dropout_rng) == ("float32", "rbg")
  # ValueError from the config's own check; TypeError when the type-check hook sees it first.
  with pytest.raises((ValueError, TypeError), match="dropout_rng"):
    TransformerConfig.tiny(dropout_rng="philox")


def test_dropout_key_as_converts_deterministically_and_keeps_a_matching_key():
  key = jax.random.key(3)
  assert dropout_key_as(key, "threefry2x32") is key
  assert dropout_key_as(key, None) is key
  rbg = dropout_key_as(key, "rbg")
  assert jax.random.key_impl(rbg) == "rbg"
  np.testing.assert_array_equal(
    jax.random.key_data(rbg), jax.random.key_data(dropout_key_as(jax.random.key(3), "rbg"))
  )
  assert not np.array_equal(
    jax.random.key_data(rbg), jax.random.key_data(dropout_key_as(jax.random.key(4), "rbg"))
  )
  # The bits are a fair coin: a Bernoulli(0.9) mask of 100k draws keeps 90% +- 0.3%.
  keep = jax.random.bernoulli(rbg, 0.9, (100_000,))
  assert abs(float(jnp.mean(keep)) - 0.9) < 0.003


@pytest.mark.parametrize("dropout_rng", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_train_step_draws_with_the_configured_prng_reproducibly(dropout_rng):
  """Each choice gives the same step twice from the same state and key; "auto" on float32
  compute is exactly threefry2x32, what steps drew before the option existed; the other
  implementations draw other masks."""
  config = TransformerConfig.tiny(dropout_rate=0.3)
  batch = random_batch(64, 4, 8, 8)

  def loss_of(rng: str) -> float:
    model = EncoderDecoder(config.replace(dropout_rng=rng), rngs=nnx.Rngs(params=0, dropout=1))
    steps, state = build_step(model)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
      return float(jax.jit(steps.train_step)(state, batch)[1]["loss_sum"])

  assert loss_of(dropout_rng) == loss_of(dropout_rng)
  if dropout_rng == "threefry2x32":
    assert loss_of("auto") == loss_of(dropout_rng)
  else:
    assert loss_of(dropout_rng) != loss_of("threefry2x32")


def train_losses(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


def scanned_rbg_config(steps: int):
  config = smoke.get_config()
  config.num_train_steps = steps
  config.model.update(num_encoder_layers=2, num_decoder_layers=2, scan_layers=True)
  config.model.dropout_rng = "rbg"
  return config


@pytest.mark.slow
def test_scanned_rbg_run_resumes_exactly_and_exports_per_layer_names(tmp_path):
  """Stacked layers, dropout from rbg: stop after 3 steps and resume, and steps 4-6 repeat the
  uninterrupted run's losses; the exported model has the unrolled names and loads as an
  unrolled model with the run's parameters."""
  reference = run(scanned_rbg_config(6), tmp_path / "reference")
  run(scanned_rbg_config(3), tmp_path / "resumed")
  resumed = run(scanned_rbg_config(6), tmp_path / "resumed")
  want, got = train_losses(tmp_path / "reference"), train_losses(tmp_path / "resumed")
  assert sorted(got) == list(range(1, 7))
  for step in range(1, 7):
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
  assert resumed["eval/loss"] == pytest.approx(reference["eval/loss"], rel=1e-6)

  spec, exported, _, _ = read_model(tmp_path / "reference")
  assert not spec.model.scan_layers and spec.model.dropout_rng == "rbg"
  assert "encoder/layers/1/self_attention/query" in exported
  assert not any(name.startswith("encoder/layers/self_attention") for name in exported)
  loaded = load_run(tmp_path / "reference")
  assert not loaded.model.config.scan_layers
  for name, value in model_params(loaded.model).items():
    np.testing.assert_array_equal(value, exported[name], err_msg=name)
  # A checkpoint holds the stacked parameters; loading it gives the same unrolled model.
  from_checkpoint = model_params(load_run(tmp_path / "reference", step=6).model)
  for name, value in from_checkpoint.items():
    np.testing.assert_array_equal(value, exported[name], err_msg=name)
