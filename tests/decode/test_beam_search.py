"""Beam search: greedy as its K = 1 case, scores from a full forward pass, never below greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.decode import beam_search, greedy_decode, length_penalty

MAX_LENGTH = 10


def full_forward_scores(model, src_BS, tokens_BKT, alpha):
  """log p(tokens | source) / ((5 + length) / 6)^alpha from one non-cached forward pass.

  length counts the tokens up to and including the first EOS (all of them if there is none).
  """
  batch, beams, length = tokens_BKT.shape
  tokens_RT = np.asarray(tokens_BKT).reshape(batch * beams, length)
  tgt_in_RT = np.concatenate([np.full((batch * beams, 1), BOS_ID), tokens_RT[:, :-1]], axis=1)
  forward = nnx.jit(lambda model, src_BS, tgt_in_BT: model(src_BS, tgt_in_BT))
  logits_RTV = forward(model, jnp.repeat(src_BS, beams, axis=0), jnp.asarray(tgt_in_RT, jnp.int32))
  log_probs_RTV = jax.nn.log_softmax(np.asarray(logits_RTV, np.float64), axis=-1)
  log_probs_RTV = np.asarray(log_probs_RTV)
  token_log_probs_RT = np.take_along_axis(log_probs_RTV, tokens_RT[:, :, None], axis=2)[..., 0]
  has_eos_R = np.any(tokens_RT == EOS_ID, axis=1)
  lengths_R = np.where(has_eos_R, np.argmax(tokens_RT == EOS_ID, axis=1) + 1, length)
  counted_RT = np.arange(length)[None, :] < lengths_R[:, None]
  log_p_R = np.sum(np.where(counted_RT, token_log_probs_RT, 0.0), axis=1)
  return (log_p_R / ((5.0 + lengths_R) / 6.0) ** alpha).reshape(batch, beams)


def test_length_penalty_is_gnmt():
  np.testing.assert_allclose(length_penalty(1, 0.6), 1.0)
  np.testing.assert_allclose(length_penalty(7, 0.6), 2.0 ** 0.6, rtol=1e-6)
  np.testing.assert_allclose(length_penalty(30, 0.0), 1.0)


def test_beam_of_one_without_penalty_is_greedy(copy_model, copy_sources):
  """With alpha > 0 a K = 1 search may keep going after greedy's EOS and finish better, so the
  equivalence holds for the plain log-probability ranking."""
  tokens_BKT, _ = beam_search(copy_model, copy_sources, beam_size=1, alpha=0.0,
                              max_length=MAX_LENGTH)
  np.testing.assert_array_equal(tokens_BKT[:, 0],
                                greedy_decode(copy_model, copy_sources, max_length=MAX_LENGTH))


@pytest.fixture(scope="module")
def beams(copy_model, copy_sources):
  return beam_search(copy_model, copy_sources, beam_size=4, alpha=0.6, max_length=MAX_LENGTH)


def test_scores_equal_full_forward_log_prob_over_penalty(copy_model, copy_sources, beams):
  tokens_BKT, scores_BK = beams
  assert tokens_BKT.shape == (8, 4, MAX_LENGTH) and scores_BK.shape == (8, 4)
  np.testing.assert_allclose(scores_BK, full_forward_scores(copy_model, copy_sources, tokens_BKT,
                                                            0.6), atol=1e-4)


def test_hypotheses_are_distinct_sorted_and_eos_terminated(beams):
  tokens_BKT, scores_BK = (np.asarray(x) for x in beams)
  assert np.all(np.diff(scores_BK, axis=1) <= 1e-6), scores_BK
  for hypotheses_KT in tokens_BKT:
    assert len({tuple(row) for row in hypotheses_KT}) == len(hypotheses_KT)
    for row in hypotheses_KT:
      end = np.argmax(row == EOS_ID)
      assert row[end] == EOS_ID and np.all(row[:end] != PAD_ID) and np.all(row[end + 1:] == PAD_ID)


def test_beam_of_four_scores_at_least_greedy(copy_model, copy_sources, beams):
  greedy_BT = greedy_decode(copy_model, copy_sources, max_length=MAX_LENGTH)
  greedy_B = full_forward_scores(copy_model, copy_sources, greedy_BT[:, None], 0.6)[:, 0]
  assert np.all(np.asarray(beams[1][:, 0]) >= greedy_B - 1e-5), (beams[1][:, 0], greedy_B)
  # The lightly trained model leaves room to improve: beam search does, on some sentences.
  assert np.any(np.asarray(beams[1][:, 0]) > greedy_B + 1e-3)
