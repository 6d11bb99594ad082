"""model.scan_layers: the stacks as one nnx.scan over stacked [L, ...] parameters, against the
unrolled model holding the same parameters (values, gradients, decoding, names)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import DecoderOnly, EncoderDecoder, EncoderOnly, TransformerConfig
from transformer.decode import beam_search, greedy_decode
from transformer.model.stacking import params_in_layout, stacked_params, unstacked_params
from transformer.runs.params import load_strict, model_params
from transformer.train.loss import token_metrics

FAMILIES = {"translation": EncoderDecoder, "lm": DecoderOnly, "mlm": EncoderOnly}
VARIANTS = [dict(), dict(position="rope", norm="pre", activation="gelu", tie_output=False)]


def ids(seed, shape, vocab=64, low=4):
  return jnp.asarray(np.random.default_rng(seed).integers(low, vocab, size=shape), jnp.int32)


def packed_batch():
  """Two rows, each packing two pairs (segments 1, 2; positions from 0 in each; padding 0)."""
  src_segments = np.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]], np.int32)
  tgt_segments = np.asarray([[1, 1, 2, 2, 2], [1, 1, 1, 2, 0]], np.int32)
  positions = lambda seg: jnp.asarray(
    [[int(np.sum(row[:i] == s)) if s else 0 for i, s in enumerate(row)] for row in seg], jnp.int32
  )
  src = jnp.where(src_segments > 0, ids(0, (2, 6)), 0)
  tgt = jnp.where(tgt_segments > 0, ids(1, (2, 5)), 0)
  return dict(
    src_ids_BS=src,
    tgt_ids_BT=tgt,
    src_segments_BS=jnp.asarray(src_segments),
    tgt_segments_BT=jnp.asarray(tgt_segments),
    src_positions_BS=positions(src_segments),
    tgt_positions_BT=positions(tgt_segments),
  )


def logits_of(task, model):
  if task == "translation":
    batch = packed_batch()
    return model(batch.pop("src_ids_BS"), batch.pop("tgt_ids_BT"), **batch)
  if task == "lm":
    return model(ids(2, (2, 7)).at[1, 5:].set(0))
  return model.mlm_logits(ids(3, (2, 7)).at[0, 4:].set(0))


def twin_models(task, variant):
  """(unrolled, scanned): the scanned model starts from another seed and is then given the
  unrolled model's parameters, stacked, through the exported-name path. Seed 3: a random
  model's greedy output is often one token repeated, which would compare nothing; this seed's
  is not (the decoding test checks)."""
  config = TransformerConfig.tiny(num_encoder_layers=3, num_decoder_layers=3, **variant)
  family = FAMILIES[task]
  unrolled = family(config, rngs=nnx.Rngs(params=3, dropout=1))
  scanned = family(config.replace(scan_layers=True), rngs=nnx.Rngs(params=7, dropout=8))
  load_strict(scanned, model_params(unrolled), "the unrolled model")
  return unrolled, scanned


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_scanned_stacks_equal_the_unrolled_model_in_values_and_gradients(task, variant):
  unrolled, scanned = twin_models(task, variant)
  stacked_names = [n for n in model_params(scanned) if "/layers/" in n]
  assert stacked_names and all(model_params(scanned)[n].shape[0] == 3 for n in stacked_names)
  assert not any("/layers/0/" in n for n in stacked_names)
  np.testing.assert_allclose(
    logits_of(task, scanned), logits_of(task, unrolled), rtol=1e-5, atol=1e-5
  )

  def flat_gradients(model) -> dict[str, np.ndarray]:
    """d loss / d parameters by (unrolled) name, jitted with the graph static."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      merged = nnx.merge(graphdef, params, rest, copy=True)
      logits_BTV = logits_of(task, merged)
      targets_BT = ids(4, logits_BTV.shape[:2])
      return token_metrics(logits_BTV, targets_BT, jnp.ones(targets_BT.shape), 0.1)["loss_sum"]

    grads = jax.jit(jax.grad(loss))(params)
    flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(grads)}
    return unstacked_params(flat)

  grads = {"unrolled": flat_gradients(unrolled), "scanned": flat_gradients(scanned)}
  assert grads["scanned"].keys() == grads["unrolled"].keys()
  # Summation orders differ (one layer body, compiled once): float32 rounding relative to the
  # largest gradient, which also covers gradients that are zero but for rounding (key biases).
  atol = 1e-5 * max(float(np.max(np.abs(g))) for g in grads["unrolled"].values())
  for name, value in grads["unrolled"].items():
    np.testing.assert_allclose(grads["scanned"][name], value, rtol=1e-5, atol=atol, err_msg=name)


def test_a_scanned_model_initialises_to_the_unrolled_parameters_of_its_seed():
  config = TransformerConfig.tiny()
  unrolled = model_params(EncoderDecoder(config, rngs=nnx.Rngs(0)))
  scanned = model_params(EncoderDecoder(config.replace(scan_layers=True), rngs=nnx.Rngs(0)))
  assert unstacked_params(scanned).keys() == unrolled.keys()
  for name, value in unstacked_params(scanned).items():
    np.testing.assert_array_equal(value, unrolled[name], err_msg=name)


def test_names_convert_between_layouts_both_ways():
  rng = np.random.default_rng(0)
  unrolled = {f"decoder/layers/{i}/feed_forward/wi": rng.normal(size=(2, 3)) for i in range(4)}
  unrolled["decoder/embed/table"] = rng.normal(size=(5, 2))
  stacked = stacked_params(unrolled)
  assert stacked.keys() == {"decoder/layers/feed_forward/wi", "decoder/embed/table"}
  np.testing.assert_array_equal(
    stacked["decoder/layers/feed_forward/wi"][2], unrolled["decoder/layers/2/feed_forward/wi"]
  )
  back = unstacked_params(stacked)
  assert back.keys() == unrolled.keys()
  for name in unrolled:
    np.testing.assert_array_equal(back[name], unrolled[name])
  assert params_in_layout(stacked, unrolled).keys() == unrolled.keys()
  assert params_in_layout(unrolled, stacked).keys() == stacked.keys()
  with pytest.raises(ValueError, match=r"not 0 \.\. L-1"):
    stacked_params({"encoder/layers/1/x": np.zeros(2)})


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_and_beam_search_decode_a_scanned_model_as_the_unrolled_one(variant):
  """Random weights, so every argmax is arbitrary: any difference in the cached layers shows."""
  unrolled, scanned = twin_models("translation", variant)
  src_BS = ids(5, (3, 6)).at[0, 3:].set(0)
  for use_cache in (True, False):
    want = greedy_decode(unrolled, src_BS, max_new_tokens=9, eos_id=-1, use_cache=use_cache)
    got = greedy_decode(scanned, src_BS, max_new_tokens=9, eos_id=-1, use_cache=use_cache)
    assert len(np.unique(want)) >= 3, want
    np.testing.assert_array_equal(got, want)
  want_tokens, want_scores = beam_search(unrolled, src_BS, beam_size=3, max_new_tokens=8)
  got_tokens, got_scores = beam_search(scanned, src_BS, beam_size=3, max_new_tokens=8)
  np.testing.assert_array_equal(got_tokens, want_tokens)
  np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5)


def test_scanned_dropout_draws_new_masks_at_every_call():
  """The layers' RNG counts advance inside the scan and are written back, as unrolled layers'
  do: two calls in train mode draw different masks, and reseeding repeats them."""
  config = TransformerConfig.tiny(dropout_rate=0.5, scan_layers=True)
  model = EncoderOnly(config, rngs=nnx.Rngs(params=0, dropout=1))
  x = ids(6, (2, 7))
  nnx.reseed(model, dropout=3, policy="match_shape")
  first, second = model(x), model(x)
  assert not np.allclose(first, second)
  nnx.reseed(model, dropout=3, policy="match_shape")
  np.testing.assert_array_equal(model(x), first)
