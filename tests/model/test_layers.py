"""Positional encodings, embeddings and the config against their formulas."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig, sinusoidal_position_encoding
from transformer.config import build_block
from transformer.errors import UserError
from transformer.model.layers import (
  Embedding,
  LayerNorm,
  PositionEncoding,
  dense_BTK_KN,
  rotary_embedding,
  tied_logits,
)


@pytest.mark.parametrize("pos", [0, 1, 7, 50, 255])
@pytest.mark.parametrize("i", [0, 1, 2, 17, 255])
def test_sinusoidal_matches_formula(pos, i):
  d = 512
  table = np.asarray(sinusoidal_position_encoding(256, d))
  assert table.shape == (256, d) and table.dtype == np.float32
  angle = pos / 10000 ** (2 * i / d)
  assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
  assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_positions_up_to_max_len_are_added_and_beyond_it_raise(position):
  """max_len = 21 (not a multiple of 8): 21 positions add the table's rows, 22 are an error
  (an out-of-range row would be NaN, spreading through attention to every output)."""
  config = TransformerConfig.tiny(max_len=21, position=position)
  encoding = PositionEncoding(config, rngs=nnx.Rngs(0))
  if position == "learned":
    table_TD = np.asarray(encoding.table[...])
  else:
    angle_TD = np.arange(21)[:, None] / 10_000 ** (np.arange(0, 32, 2) / 32)[None, :]
    table_TD = np.stack([np.sin(angle_TD), np.cos(angle_TD)], axis=-1).reshape(21, 32)
  positions = lambda t: jnp.broadcast_to(jnp.arange(t), (2, t))
  x_BTD = jnp.ones((2, 21, 32))
  expected_BTD = 1.0 + np.broadcast_to(table_TD, (2, 21, 32))
  np.testing.assert_allclose(encoding(x_BTD, positions(21)), expected_BTD, atol=1e-6)
  message = "sequence of 22 positions exceeds model.max_len=21: raise max_len or shorten"
  with pytest.raises(ValueError, match=message):
    encoding(jnp.ones((2, 22, 32)), positions(22))
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  assert np.all(np.isfinite(model.encode(jnp.full((1, 21), 5, jnp.int32))))
  with pytest.raises(ValueError, match=message):
    model.encode(jnp.full((1, 22), 5, jnp.int32))


def test_embedding_is_scaled_by_sqrt_d_model_and_tied():
  config = TransformerConfig.tiny()
  embed = Embedding(config, rngs=nnx.Rngs(0))
  ids = jnp.array([[3, 5, 0]])
  table = np.asarray(embed.table[...])
  np.testing.assert_allclose(embed(ids)[0], table[[3, 5, 0]] * math.sqrt(config.d_model), rtol=1e-6)
  x = np.random.default_rng(0).normal(size=(1, 2, config.d_model)).astype(np.float32)
  np.testing.assert_allclose(embed.attend(jnp.asarray(x)), x @ table.T, rtol=1e-5, atol=1e-5)


def test_rope_rotates_so_scores_depend_on_offset_only():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  score = lambda pq, pk: float(
    jnp.sum(rotary_embedding(q, jnp.array([[pq]])) * rotary_embedding(k, jnp.array([[pk]])))
  )
  assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
  np.testing.assert_allclose(
    jnp.linalg.norm(rotary_embedding(q, jnp.array([[5]]))), jnp.linalg.norm(q), rtol=1e-6
  )


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(d_model=30, num_heads=4), "not divisible by model.num_heads"),
    (dict(d_model=0), "must be positive"),
    (dict(position="alibi"), "unknown: use one of"),
    (dict(attention="flash"), "unknown: use one of"),
    (dict(dropout_rate=1.0), r"must be in \[0, 1\)"),
  ],
)
def test_config_rejects_bad_values(change, message):
  """Every config source (recipe, command line, config.json, model.json) builds the block
  through the schema, which names the key and the fix."""
  values = {**dataclasses.asdict(TransformerConfig.tiny()), **change}
  with pytest.raises(UserError, match=message):
    build_block(TransformerConfig, values, prefix="model.")


def test_tied_logits_custom_backward_equals_autodiff():
  """The hand-written backward of x E^T (d E computed as (x^T d logits)^T) against JAX's own
  derivative of the plain einsum."""
  rng = np.random.default_rng(0)
  x_BTD = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  table_VD = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  cotangent_BTV = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
  plain = lambda x, e: jnp.einsum("BTD,VD->BTV", x, e)

  def value_and_grads(f):
    out, vjp = jax.vjp(f, x_BTD, table_VD)
    return (out, *vjp(cotangent_BTV))

  for got, want in zip(value_and_grads(tied_logits), value_and_grads(plain)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k, n", [(16, 6), (6, 16), (8, 8)])
def test_dense_backward_matches_the_float64_formula_wide_tall_and_square(k, n):
  """x W and its hand-written backward (a tall weight's gradient computed as (dy^T x)^T on the
  CPU) against NumPy in float64: dx = dy W^T, dW = x^T dy over all B T rows."""
  rng = np.random.default_rng(k * n)
  x_BTK, w_KN, d_y_BTN = (rng.normal(size=s) for s in ((2, 3, k), (k, n), (2, 3, n)))
  y, vjp = jax.vjp(dense_BTK_KN, jnp.float32(x_BTK), jnp.float32(w_KN))
  d_x, d_w = vjp(jnp.float32(d_y_BTN))
  np.testing.assert_allclose(y, x_BTK @ w_KN, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_x, d_y_BTN @ w_KN.T, rtol=1e-5, atol=1e-5)
  want_d_w = x_BTK.reshape(-1, k).T @ d_y_BTN.reshape(-1, n)
  assert d_w.shape == (k, n)
  np.testing.assert_allclose(d_w, want_d_w, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_round_the_float32_logits_and_keep_their_gradients():
  """logits_dtype="bfloat16" returns the float32 logits rounded once (accumulation stays in
  float32), and the loss through them has the float32 model's gradients up to that rounding."""
  from transformer.train.loss import token_metrics

  rng = np.random.default_rng(1)
  x_BTD = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
  targets_BT = jnp.asarray(rng.integers(0, 64, size=(2, 3)))
  loss = lambda embed: token_metrics(embed.attend(x_BTD), targets_BT, jnp.ones((2, 3)), 0.1)[
    "loss_sum"
  ]
  logits, grads = {}, {}
  for dtype in ("float32", "bfloat16"):
    embed = Embedding(TransformerConfig.tiny(logits_dtype=dtype), rngs=nnx.Rngs(0))
    logits[dtype] = embed.attend(x_BTD)
    assert logits[dtype].dtype == jnp.dtype(dtype)
    grads[dtype] = jax.grad(loss)(embed).table[...]
  np.testing.assert_array_equal(logits["bfloat16"], logits["float32"].astype(jnp.bfloat16))
  np.testing.assert_allclose(grads["bfloat16"], grads["float32"], rtol=2e-2, atol=2e-3)


def test_layer_norm_matches_float64_formula_even_far_from_zero_mean():
  """Against NumPy float64; a mean of 1e4 with unit spread is where E[x^2] - E[x]^2 in float32
  loses every digit of the variance, and bfloat16 input gets the float32 result rounded once."""
  config = TransformerConfig.tiny()
  norm = LayerNorm(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  norm.scale[...] = jnp.asarray(rng.normal(size=config.d_model), jnp.float32)
  norm.bias[...] = jnp.asarray(rng.normal(size=config.d_model), jnp.float32)
  x_BTD = (1e4 + rng.normal(size=(2, 3, config.d_model))).astype(np.float32)
  x64 = x_BTD.astype(np.float64)
  normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(
    x64.var(-1, keepdims=True) + config.layer_norm_epsilon
  )
  expected_BTD = normed * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
  np.testing.assert_allclose(norm(jnp.asarray(x_BTD)), expected_BTD, rtol=0, atol=1e-2)

  bf16_norm = LayerNorm(TransformerConfig.tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(bf16_norm, nnx.state(norm))
  x_bf16 = jnp.asarray(rng.normal(size=(2, 3, config.d_model)), jnp.bfloat16)
  got = bf16_norm(x_bf16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, norm(x_bf16.astype(jnp.float32)).astype(jnp.bfloat16))


def test_layer_norm_gradients_match_autodiff_of_the_float64_formula():
  """The closed-form backward pass against JAX's autodiff of the plain formula in float64, for
  the input, scale and bias, with a mean far from zero as above."""
  config = TransformerConfig.tiny()
  rng = np.random.default_rng(1)
  x = (3.0 + rng.normal(size=(2, 5, config.d_model))).astype(np.float32)
  scale, bias = (rng.normal(size=config.d_model).astype(np.float32) for _ in range(2))
  d_y = rng.normal(size=x.shape).astype(np.float32)
  eps = config.layer_norm_epsilon

  def formula(x, scale, bias):
    normed = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps)
    return jnp.sum((normed * scale[None, None] + bias[None, None]) * d_y.astype(x.dtype))

  def ours(x, scale, bias):
    norm = LayerNorm(config, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = scale, bias
    return jnp.sum(norm(x) * jnp.asarray(d_y))

  with jax.enable_x64():
    expected = jax.grad(formula, argnums=(0, 1, 2))(*(np.float64(a) for a in (x, scale, bias)))
  got = jax.grad(ours, argnums=(0, 1, 2))(*(jnp.asarray(a) for a in (x, scale, bias)))
  for g, e in zip(got, expected, strict=True):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def test_layer_norm_without_bias_matches_the_float64_formula_and_its_gradients():
  """`use_bias=False`: (x - mean) / sqrt(var + eps) * scale, and its gradients for x and scale
  against JAX's autodiff of that formula in float64."""
  config = TransformerConfig.tiny(use_bias=False)
  assert LayerNorm(config, rngs=nnx.Rngs(0)).bias is None
  rng = np.random.default_rng(2)
  x = (3.0 + rng.normal(size=(2, 5, config.d_model))).astype(np.float32)
  scale = rng.normal(size=config.d_model).astype(np.float32)
  d_y = rng.normal(size=x.shape).astype(np.float32)
  eps = config.layer_norm_epsilon

  def formula(x, scale):
    normed = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps)
    return normed * scale[None, None]

  def ours(x, scale):
    norm = LayerNorm(config, rngs=nnx.Rngs(0))
    norm.scale[...] = scale
    return norm(x)

  with jax.enable_x64():
    x64, scale64 = np.float64(x), np.float64(scale)
    expected_y = formula(x64, scale64)
    expected = jax.grad(lambda *a: jnp.sum(formula(*a) * np.float64(d_y)), argnums=(0, 1))(
      x64, scale64
    )
  np.testing.assert_allclose(ours(jnp.asarray(x), jnp.asarray(scale)), expected_y, atol=1e-5)
  got = jax.grad(lambda *a: jnp.sum(ours(*a) * jnp.asarray(d_y)), argnums=(0, 1))(
    jnp.asarray(x), jnp.asarray(scale)
  )
  for g, e in zip(got, expected, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def test_layer_norm_state_has_the_layout_of_flax_layer_norm():
  """Checkpoints written when the model used nnx.LayerNorm restore into this one."""
  config = TransformerConfig.tiny()
  ours = nnx.state(LayerNorm(config, rngs=nnx.Rngs(0)))
  flax_norm = nnx.state(nnx.LayerNorm(config.d_model, rngs=nnx.Rngs(0)))
  shapes = lambda state: jax.tree.map(lambda v: (v.shape, v.dtype), nnx.to_pure_dict(state))
  assert shapes(ours) == shapes(flax_norm)
