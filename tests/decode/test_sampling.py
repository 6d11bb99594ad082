"""Sampling from the decoder-only model: greedy limits, reproducibility, the filtered softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import DecoderOnly, TransformerConfig
from transformer.data.tokenizer import PAD_ID
from transformer.decode import choose_token, keep_top_k, keep_top_p, sample

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def lm():
  # Untied output weights: random tied ones make the argmax nearly the same token everywhere.
  model = DecoderOnly(TransformerConfig.tiny(tie_output=False), rngs=nnx.Rngs(0))
  model.eval()
  return model


@pytest.fixture(scope="module")
def prompts():
  return jnp.asarray(np.random.default_rng(0).integers(4, 64, (3, 4)), jnp.int32)


@pytest.fixture(scope="module")
def greedy_ids(lm, prompts):
  return loop_greedy(lm, np.asarray(prompts), NEW_TOKENS)


def loop_greedy(model, prompt_BT, new_tokens, pad_id=PAD_ID):
  """Python loop over full forward passes of a fixed-width buffer, appending the argmax."""
  forward = nnx.jit(lambda model, ids_BT: model(ids_BT))
  length = prompt_BT.shape[1]
  ids_BT = np.zeros((prompt_BT.shape[0], length + new_tokens), np.int32)
  ids_BT[:, :length] = prompt_BT
  for t in range(length - 1, length + new_tokens - 1):
    logits_BV = np.array(forward(model, jnp.asarray(ids_BT))[:, t])
    logits_BV[:, pad_id] = -np.inf
    ids_BT[:, t + 1] = logits_BV.argmax(-1)
  return ids_BT


@pytest.mark.parametrize(
  "options",
  [dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6)],
  ids=["temperature_0", "top_k_1", "tiny_top_p"],
)
def test_greedy_limits_of_sampling(lm, prompts, greedy_ids, options):
  assert len(np.unique(greedy_ids[:, 4:])) > 2, greedy_ids
  ids = sample(
    lm, prompts, max_new_tokens=NEW_TOKENS, rng=jax.random.key(1), eos_id=None, **options
  )
  np.testing.assert_array_equal(ids, greedy_ids)


def test_sampling_is_reproducible_per_key(lm, prompts):
  draw = lambda seed: np.asarray(
    sample(
      lm, prompts, max_new_tokens=NEW_TOKENS, eos_id=None, rng=jax.random.key(seed), temperature=1.0
    )
  )
  first = draw(0)
  np.testing.assert_array_equal(first[:, :4], prompts)
  np.testing.assert_array_equal(first, draw(0))
  assert not np.array_equal(first, draw(1))
  assert not np.any(first == PAD_ID)


def test_rows_end_at_eos(lm, prompts, greedy_ids):
  """Whichever token the model's greedy path emits second serves as EOS: the row stops there."""
  ids = greedy_ids
  eos = int(ids[0, 5])
  ended = np.asarray(
    sample(
      lm, prompts, max_new_tokens=NEW_TOKENS, rng=jax.random.key(0), temperature=0.0, eos_id=eos
    )
  )
  first_eos = np.argmax(ids[0, 4:] == eos) + 4
  np.testing.assert_array_equal(ended[0, : first_eos + 1], ids[0, : first_eos + 1])
  assert np.all(ended[0, first_eos + 1 :] == PAD_ID)


def test_filters_keep_the_expected_tokens():
  logits_1V = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda x: np.asarray(x[0] > -1e6)
  np.testing.assert_array_equal(kept(keep_top_k(logits_1V, 2)), [False, True, False, True])
  np.testing.assert_array_equal(kept(keep_top_p(logits_1V, 0.7)), [False, True, False, True])
  np.testing.assert_array_equal(kept(keep_top_p(logits_1V, 0.85)), [False, True, True, True])
  np.testing.assert_array_equal(kept(keep_top_p(logits_1V, 0.1)), [False, True, False, False])


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 3, None), (1.0, None, 0.8)])
def test_token_frequencies_follow_filtered_softmax(temperature, top_k, top_p):
  logits_V = np.array([0.0, 1.0, 2.0, 0.5, -1.0, 1.5], np.float32)  # index 0 is PAD
  draws = 4000
  choose = jax.jit(
    jax.vmap(
      lambda key: choose_token(
        jnp.asarray(logits_V)[None],
        key,
        pad_id=PAD_ID,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
      )[0]
    )
  )
  tokens = np.asarray(choose(jax.random.split(jax.random.key(0), draws)))
  # NumPy reference: PAD removed, softmax at the temperature, top-k or the nucleus renormalised.
  probs_V = np.exp(logits_V / temperature)
  probs_V[PAD_ID] = 0.0
  probs_V /= probs_V.sum()
  order = np.argsort(-probs_V)
  keep = np.zeros_like(probs_V, bool)
  if top_k is not None:
    keep[order[:top_k]] = True
  else:
    mass_above = np.cumsum(probs_V[order]) - probs_V[order]
    keep[order[mass_above < top_p]] = True
  expected_V = np.where(keep, probs_V, 0.0) / np.sum(np.where(keep, probs_V, 0.0))
  frequencies_V = np.bincount(tokens, minlength=len(logits_V)) / draws
  np.testing.assert_allclose(frequencies_V, expected_V, atol=0.03)


def test_positions_after_an_early_eos_hold_the_configs_pad_id():
  """With pad_id 5, a row that ends before max_new_tokens is padded with 5, not 0. One row, so
  the loop stops at its EOS and never writes the remaining positions itself."""
  pad_id = 5
  model = DecoderOnly(TransformerConfig.tiny(tie_output=False, pad_id=pad_id), rngs=nnx.Rngs(0))
  model.eval()
  prompt_1T = np.asarray(np.random.default_rng(0).integers(6, 64, (1, 4)), np.int32)
  expected = loop_greedy(model, prompt_1T, NEW_TOKENS, pad_id=pad_id)
  eos = int(expected[0, 5])  # the second new token: the row ends with NEW_TOKENS - 2 left
  first_eos = np.argmax(expected[0, 4:] == eos) + 4
  assert first_eos < expected.shape[1] - 1
  ended = np.asarray(
    sample(
      model,
      jnp.asarray(prompt_1T),
      max_new_tokens=NEW_TOKENS,
      rng=jax.random.key(0),
      temperature=0.0,
      eos_id=eos,
    )
  )
  np.testing.assert_array_equal(ended[0, : first_eos + 1], expected[0, : first_eos + 1])
  np.testing.assert_array_equal(ended[0, first_eos + 1 :], pad_id)


def test_top_p_of_one_keeps_every_token():
  """p = 1 is no filtering: float32 cumulative sums reach 1.0 before the last token, which
  once dropped the tail of most rows of a 4,000-word vocabulary."""
  logits_BV = jnp.asarray(np.random.default_rng(0).normal(size=(400, 4000)) * 3, jnp.float32)
  kept_BV = keep_top_p(logits_BV, 1.0)
  np.testing.assert_array_equal(np.asarray(kept_BV), np.asarray(logits_BV))
