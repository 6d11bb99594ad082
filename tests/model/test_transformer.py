"""The three families: causality, padding, KV-cache decoding, parameter counts, gradients, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import DecoderOnly, EncoderDecoder, EncoderOnly, TransformerConfig

VARIANTS = [
  dict(),
  dict(position="rope", norm="pre", activation="gelu"),
  dict(position="learned", share_embeddings=False, tie_output=False),
]


def random_ids(seed, shape, vocab=64, low=4):
  return jnp.asarray(np.random.default_rng(seed).integers(low, vocab, size=shape), jnp.int32)


def param_count(model_fn) -> int:
  abstract = nnx.eval_shape(model_fn)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_is_causal(variant):
  config = TransformerConfig.tiny(**variant)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  lm = DecoderOnly(config, rngs=nnx.Rngs(1))
  src, tgt = random_ids(0, (2, 7)), random_ids(1, (2, 9))
  t = 4
  changed = tgt.at[:, t + 1 :].set(random_ids(2, (2, 9 - t - 1)))
  np.testing.assert_allclose(
    model(src, tgt)[:, : t + 1], model(src, changed)[:, : t + 1], atol=1e-5
  )
  np.testing.assert_allclose(lm(tgt)[:, : t + 1], lm(changed)[:, : t + 1], atol=1e-5)
  assert not np.allclose(lm(tgt)[:, t + 1 :], lm(changed)[:, t + 1 :], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_padding_changes_no_real_position(variant):
  """A sentence padded to any length gives the outputs it gives alone, at its real positions."""
  config = TransformerConfig.tiny(**variant)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  encoder = EncoderOnly(config, rngs=nnx.Rngs(0))
  src, tgt = random_ids(3, (1, 5)), random_ids(4, (1, 6))
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n)), constant_values=config.pad_id)
  np.testing.assert_allclose(model(pad(src, 4), pad(tgt, 3))[:, :6], model(src, tgt), atol=1e-5)
  np.testing.assert_allclose(encoder(pad(src, 6))[:, :5], encoder(src), atol=1e-5)


def incremental_logits(step, ids, prefill):
  """Feeds `prefill` tokens at once, then one at a time, collecting every position's logits."""
  logits = [step(ids[:, :prefill])]
  logits += [step(ids[:, t : t + 1]) for t in range(prefill, ids.shape[1])]
  return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize(
  "variant",
  [*VARIANTS[:2], dict(position="learned", norm="pre", activation="gelu", use_bias=False)],
)
def test_kv_cache_decoding_equals_full_forward(variant):
  config = TransformerConfig.tiny(**variant)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  lm = DecoderOnly(config, rngs=nnx.Rngs(0))
  src, tgt = random_ids(5, (2, 7)).at[1, 5:].set(0), random_ids(6, (2, 8))

  memory = model.encode(src)
  model.init_cache(memory, src, cache_length=12)
  step = lambda ids: model.decode(ids, use_cache=True)
  np.testing.assert_allclose(incremental_logits(step, tgt, prefill=1), model(src, tgt), atol=1e-5)

  lm.init_cache(batch_size=2, cache_length=12)
  step = lambda ids: lm(ids, use_cache=True)
  np.testing.assert_allclose(incremental_logits(step, tgt, prefill=3), lm(tgt), atol=1e-5)


BIASES = ("bias", "bi", "bo", "query_bias", "key_bias", "value_bias", "out_bias")


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_a_model_without_biases_is_the_model_with_zero_biases(norm):
  """`use_bias=False` leaves out exactly the projections' and LayerNorms' biases (the output
  layers' stay); with the other parameters copied over, every family gives
  the logits and the gradients of the model with biases, whose biases start at zero."""
  config = TransformerConfig.tiny(norm=norm, activation="gelu")
  src, tgt = random_ids(9, (2, 6)), random_ids(10, (2, 5))
  families = [
    (EncoderDecoder, lambda m: m(src, tgt)),
    (DecoderOnly, lambda m: m(tgt)),
    (EncoderOnly, lambda m: m.mlm_logits(src)),
  ]
  for family, forward in families:
    biased = family(config, rngs=nnx.Rngs(0))
    plain = family(config.replace(use_bias=False), rngs=nnx.Rngs(1))
    biased_params = dict(nnx.to_flat_state(nnx.state(biased, nnx.Param)))
    plain_params = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    # The MLM head's output bias stays, like an untied output layer's.
    left_out = {p for p in biased_params if p[-1] in BIASES and p != ("mlm_head", "bias")}
    assert left_out and set(plain_params) == set(biased_params) - left_out
    nnx.update(plain, nnx.from_flat_state({p: biased_params[p] for p in plain_params}))
    np.testing.assert_allclose(forward(plain), forward(biased), atol=1e-6)
    loss = lambda m, forward=forward: jnp.mean(forward(m) ** 2)
    plain_grads = dict(nnx.to_flat_state(nnx.grad(loss)(plain)))
    biased_grads = dict(nnx.to_flat_state(nnx.grad(loss)(biased)))
    for path, grad in plain_grads.items():
      np.testing.assert_allclose(grad[...], biased_grads[path][...], atol=1e-6, err_msg=str(path))


def test_parameter_counts_match_table_3():
  """Base ~65M and big ~213M parameters with a 37k shared vocabulary (Table 3)."""
  base = param_count(lambda: EncoderDecoder(TransformerConfig.base(37_000), rngs=nnx.Rngs(0)))
  big = param_count(lambda: EncoderDecoder(TransformerConfig.big(37_000), rngs=nnx.Rngs(0)))
  assert abs(base - 65e6) / 65e6 < 0.03, base
  assert abs(big - 213e6) / 213e6 < 0.03, big


def _assert_every_gradient_nonzero(grads):
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
  config = TransformerConfig.tiny(**variant)
  src, tgt = random_ids(7, (2, 6)), random_ids(8, (2, 5))
  models_and_losses = [
    (EncoderDecoder(config, rngs=nnx.Rngs(0)), lambda m: jnp.mean(m(src, tgt) ** 2)),
    (DecoderOnly(config, rngs=nnx.Rngs(0)), lambda m: jnp.mean(m(tgt) ** 2)),
    (
      EncoderOnly(config, rngs=nnx.Rngs(0)),
      lambda m: jnp.mean(m.mlm_logits(src) ** 2) + jnp.mean(m.classify(src) ** 2),
    ),
  ]
  for model, loss in models_and_losses:
    _assert_every_gradient_nonzero(nnx.grad(loss)(model))


def test_jitted_forward_traces_once_per_shape():
  config = TransformerConfig.tiny()
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  traces = []

  @nnx.jit
  def forward(model, src, tgt):
    traces.append(src.shape)
    return model(src, tgt)

  for seed in range(3):
    forward(model, random_ids(seed, (2, 6)), random_ids(seed + 1, (2, 5)))
  assert len(traces) == 1


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  """bfloat16 compute: float32 parameters and logits; with logits_dtype "auto" the logits are
  bfloat16, the float32 logits of the same bfloat16 model rounded once."""
  config = TransformerConfig.tiny(dtype="bfloat16")
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  narrow = EncoderDecoder(config.replace(logits_dtype="auto"), rngs=nnx.Rngs(0))
  reference = EncoderDecoder(config.replace(dtype="float32"), rngs=nnx.Rngs(0))
  src, tgt = random_ids(9, (2, 6)), random_ids(10, (2, 5))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
  memory = model.encode(src)
  assert memory.dtype == jnp.bfloat16
  logits, narrow_logits = model(src, tgt), narrow(src, tgt)
  assert (logits.dtype, narrow_logits.dtype) == (jnp.float32, jnp.bfloat16)
  np.testing.assert_array_equal(narrow_logits, logits.astype(jnp.bfloat16))
  np.testing.assert_allclose(logits, reference(src, tgt), atol=0.1)


@pytest.mark.slow
def test_bfloat16_param_dtype_reaches_every_parameter_of_every_family():
  """param_dtype="bfloat16" stores every weight in bfloat16, the BERT heads included; the
  classifier still returns float32 logits."""
  config = TransformerConfig.tiny(param_dtype="bfloat16")
  src = random_ids(13, (2, 6))
  for family in (EncoderDecoder, DecoderOnly, EncoderOnly):
    model = family(config, rngs=nnx.Rngs(0))
    dtypes = {
      jax.tree_util.keystr(path): x.dtype
      for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }
    assert set(dtypes.values()) == {jnp.dtype("bfloat16")}, (family.__name__, dtypes)
  logits_BC = model.classify(src)
  assert logits_BC.dtype == jnp.float32 and np.all(np.isfinite(logits_BC))
  assert np.all(np.isfinite(model.mlm_logits(src).astype(jnp.float32)))


def test_dropout_is_active_in_train_mode_only():
  config = TransformerConfig.tiny(dropout_rate=0.3, attention_dropout_rate=0.2)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  src, tgt = random_ids(11, (2, 6)), random_ids(12, (2, 5))
  model.eval()
  np.testing.assert_array_equal(model(src, tgt), model(src, tgt))
  model.train()
  assert not np.allclose(model(src, tgt), model(src, tgt))
