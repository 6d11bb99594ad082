"""The recurrent baselines against NumPy recurrences, and the LSTM encoder-decoder's plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.baselines.rnn import GRU, LSTM, CudnnLSTM, LSTMSeq2Seq, RNNConfig
from transformer.data.tokenizer import BOS_ID
from transformer.decode.greedy import greedy_decode

# Two decoder layers so the stacked layer's path is covered; one encoder layer keeps it fast.
# One shared size: the model's initialisers then compile once for all tests.
SEQ2SEQ = RNNConfig(
  vocab_size=13, d_model=8, num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0
)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(x_BTI, w_x_IGD, w_h_DGD, b_GD, reverse=False):
  """The textbook recurrence, one position at a time in float64, gates in order i, f, g, o."""
  b, t, _ = x_BTI.shape
  d = w_h_DGD.shape[0]
  h, c = np.zeros((b, d)), np.zeros((b, d))
  out = np.zeros((b, t, d))
  for step in reversed(range(t)) if reverse else range(t):
    z = (
      np.einsum("bi,igd->bgd", x_BTI[:, step], w_x_IGD)
      + np.einsum("bi,igd->bgd", h, w_h_DGD)
      + b_GD
    )
    i, f, g, o = sigmoid(z[:, 0]), sigmoid(z[:, 1]), np.tanh(z[:, 2]), sigmoid(z[:, 3])
    c = f * c + i * g
    h = o * np.tanh(c)
    out[:, step] = h
  return out


def numpy_gru(x_BTI, w_x_IGD, w_h_DGD, b_GD, b_hn_D):
  b, t, _ = x_BTI.shape
  h = np.zeros((b, w_h_DGD.shape[0]))
  out = np.zeros((b, t, h.shape[1]))
  for step in range(t):
    xw = np.einsum("bi,igd->bgd", x_BTI[:, step], w_x_IGD) + b_GD
    hw = np.einsum("bi,igd->bgd", h, w_h_DGD)
    r, z = sigmoid(xw[:, 0] + hw[:, 0]), sigmoid(xw[:, 1] + hw[:, 1])
    n = np.tanh(xw[:, 2] + r * (hw[:, 2] + b_hn_D))
    h = (1 - z) * n + z * h
    out[:, step] = h
  return out


def weights(layer):
  return [
    np.asarray(p[...], np.float64) for p in (layer.input_kernel, layer.recurrent_kernel, layer.bias)
  ]


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_matches_numpy(reverse):
  layer = LSTM(5, 4, rngs=nnx.Rngs(0))
  layer.bias[...] = jax.random.normal(jax.random.key(1), layer.bias.shape)  # not just 0 and 1
  x_BTI = np.random.default_rng(0).normal(size=(2, 7, 5)).astype(np.float32)
  expected = numpy_lstm(x_BTI.astype(np.float64), *weights(layer), reverse=reverse)
  np.testing.assert_allclose(layer(jnp.asarray(x_BTI), reverse=reverse), expected, atol=1e-5)


def test_lstm_mask_skips_padding():
  """A padded row gives, at its real positions, what the unpadded sequence gives (both ways)."""
  layer = LSTM(3, 4, rngs=nnx.Rngs(0))
  x_BTI = jax.random.normal(jax.random.key(0), (1, 6, 3))
  mask_BT = jnp.array([[True] * 4 + [False] * 2])
  for reverse in (False, True):
    padded = layer(x_BTI, mask_BT, reverse=reverse)[:, :4]
    np.testing.assert_allclose(padded, layer(x_BTI[:, :4], reverse=reverse), atol=1e-6)


def test_gru_matches_numpy():
  layer = GRU(5, 4, rngs=nnx.Rngs(0))
  layer.recurrent_bias[...] = jnp.full((4,), 0.3)
  x_BTI = np.random.default_rng(1).normal(size=(2, 6, 5)).astype(np.float32)
  expected = numpy_gru(
    x_BTI.astype(np.float64), *weights(layer), np.asarray(layer.recurrent_bias[...], np.float64)
  )
  np.testing.assert_allclose(layer(jnp.asarray(x_BTI)), expected, atol=1e-5)


@pytest.mark.parametrize("layer_class", [LSTM, GRU])
@pytest.mark.parametrize("reverse", [False, True])
def test_cudnn_style_backward_equals_scan_autodiff(layer_class, reverse):
  """The weight gradients summed after the loop equal JAX's own transpose of the scan."""
  fast = layer_class(3, 4, rngs=nnx.Rngs(0))
  plain = layer_class(3, 4, rngs=nnx.Rngs(0), weight_grads_in_loop=True)
  x_BTI = jax.random.normal(jax.random.key(0), (2, 5, 3))
  mask_BT = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
  dy_BTD = jax.random.normal(jax.random.key(1), (2, 5, 4))

  def grads(layer):
    graphdef, params = nnx.split(layer, nnx.Param)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, mask_BT, reverse=reverse) * dy_BTD)
    return jax.grad(loss, argnums=(0, 1))(params, x_BTI)

  expected, got = grads(plain), grads(fast)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cudnn_lstm_equals_the_numpy_recurrence_and_the_scan_gradients():
  """cuDNN's kernel with our packed weights: values against NumPy (float64), and the gradients
  of parameters and inputs against the scan LSTM with the same parameters, padding included."""
  layer = CudnnLSTM(24, 16, rngs=nnx.Rngs(0))
  layer.bias[...] = jax.random.normal(jax.random.key(1), layer.bias.shape)
  x_BTI = np.random.default_rng(2).normal(size=(3, 9, 24)).astype(np.float32)
  expected = numpy_lstm(x_BTI.astype(np.float64), *weights(layer))
  with jax.default_matmul_precision("highest"):  # no TF32: compare float32 with float64
    np.testing.assert_allclose(layer(jnp.asarray(x_BTI)), expected, atol=1e-5)
    mask_BT = jnp.arange(9)[None] < jnp.array([[9], [6], [1]])
    dy_BTD = jax.random.normal(jax.random.key(3), (3, 9, 16)) * mask_BT[..., None]

    def grads(call, params):
      loss = lambda p, x: jnp.sum(call(p, x) * dy_BTD)
      return jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x_BTI))

    graphdef, params = nnx.split(layer, nnx.Param)
    scan = LSTM(24, 16, rngs=nnx.Rngs(0))
    scan_graphdef, _ = nnx.split(scan, nnx.Param)
    got = grads(lambda p, x: nnx.merge(graphdef, p)(x, mask_BT), params)
    want = grads(lambda p, x: nnx.merge(scan_graphdef, p)(x, mask_BT), params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_seq2seq_shapes_and_gradients_reach_every_parameter():
  model = LSTMSeq2Seq(SEQ2SEQ, rngs=nnx.Rngs(0))
  src_BS = jnp.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]], jnp.int32)
  tgt_BT = jnp.array([[1, 3, 4, 5], [1, 6, 0, 0]], jnp.int32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert jax.eval_shape(lambda p: nnx.merge(graphdef, p, rest)(src_BS, tgt_BT), params).shape == (
    2,
    4,
    SEQ2SEQ.vocab_size,
  )

  def loss(params):
    logits_BTV = nnx.merge(graphdef, params, rest)(src_BS, tgt_BT)
    return jnp.sum(jax.nn.log_softmax(logits_BTV)[..., 2])

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in nnx.to_flat_state(grads):
    assert np.all(np.isfinite(g[...])), path
    assert np.any(np.abs(g[...]) > 0), f"no gradient reaches {path}"


def test_parameter_count_formula_and_sizing():
  config = RNNConfig(vocab_size=50, d_model=12, num_encoder_layers=2, num_decoder_layers=3)
  abstract = nnx.eval_shape(lambda: LSTMSeq2Seq(config, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert config.num_parameters() == sum(x.size for x in jax.tree.leaves(params))
  sized = RNNConfig.with_num_parameters(1_000_000, vocab_size=800)
  neighbours = [sized.replace(d_model=sized.d_model + k).num_parameters() for k in (-2, 2)]
  assert all(abs(sized.num_parameters() - 1_000_000) <= abs(n - 1_000_000) for n in neighbours)


def test_padding_in_the_source_changes_nothing():
  """Extra source padding is invisible: the encoder skips it and attention never reads it."""
  model = LSTMSeq2Seq(SEQ2SEQ, rngs=nnx.Rngs(0))
  src_BS = jnp.array([[3, 4, 5]], jnp.int32)
  tgt_BT = jnp.array([[1, 7, 8]], jnp.int32)
  padded_BS = jnp.pad(src_BS, ((0, 0), (0, 3)))
  graphdef, state = nnx.split(model)
  apply = jax.jit(lambda src: nnx.merge(graphdef, state)(src, tgt_BT))
  np.testing.assert_allclose(apply(padded_BS), apply(src_BS), atol=1e-5)


@pytest.mark.slow
def test_greedy_decoding_with_the_recurrent_state_equals_recomputing_and_a_python_loop():
  """The LSTM's cached decoding (state carried step to step) and the recompute path both give
  the tokens of a plain loop that reruns the whole model on the prefix and takes the argmax."""
  model = LSTMSeq2Seq(SEQ2SEQ.replace(max_len=6), rngs=nnx.Rngs(3))
  model.eval()
  src_BS = jnp.array([[3, 4, 5, 6, 0], [7, 8, 9, 10, 11]], jnp.int32)
  prefix_BT = np.full((2, 1), BOS_ID, np.int32)
  for _ in range(6):
    logits_BTV = np.array(model(src_BS, jnp.asarray(prefix_BT))[:, -1])
    logits_BTV[:, SEQ2SEQ.pad_id] = -np.inf
    prefix_BT = np.concatenate([prefix_BT, logits_BTV.argmax(-1)[:, None]], axis=1)
  expected_BT = prefix_BT[:, 1:]
  for use_cache in (True, False):
    got_BT = greedy_decode(model, src_BS, max_new_tokens=6, use_cache=use_cache, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(got_BT), expected_BT, err_msg=f"{use_cache=}")
