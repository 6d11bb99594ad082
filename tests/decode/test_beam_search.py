"""Beam search: greedy as its W = 1 case, scores from a full forward pass, never below greedy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from transformer import EncoderDecoder, TransformerConfig
from transformer.baselines.rnn import LSTMSeq2Seq, RNNConfig
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.decode import beam_search, greedy_decode, length_penalty
from transformer.decode.beam_search import top_k_in_chunks
from transformer.decode.greedy import NEG_INF

MAX_LENGTH = 10


def numpy_log_softmax(logits_XV):
  """log softmax in float64, shifted by the row maximum."""
  shifted_XV = np.asarray(logits_XV, np.float64)
  shifted_XV = shifted_XV - shifted_XV.max(axis=-1, keepdims=True)
  return shifted_XV - np.log(np.exp(shifted_XV).sum(axis=-1, keepdims=True))


def full_forward_scores(model, src_BS, tokens_BWT, alpha, eos_id=EOS_ID):
  """log p(tokens | source) / ((5 + length) / 6)^alpha from one non-cached forward pass.

  length counts the tokens up to and including the first EOS (all of them if there is none).
  """
  batch, beams, length = tokens_BWT.shape
  tokens_RT = np.asarray(tokens_BWT).reshape(batch * beams, length)
  tgt_in_RT = np.concatenate([np.full((batch * beams, 1), BOS_ID), tokens_RT[:, :-1]], axis=1)
  forward = nnx.jit(lambda model, src_BS, tgt_in_BT: model(src_BS, tgt_in_BT))
  logits_RTV = forward(model, jnp.repeat(src_BS, beams, axis=0), jnp.asarray(tgt_in_RT, jnp.int32))
  log_probs_RTV = numpy_log_softmax(logits_RTV)
  token_log_probs_RT = np.take_along_axis(log_probs_RTV, tokens_RT[:, :, None], axis=2)[..., 0]
  has_eos_R = np.any(tokens_RT == eos_id, axis=1)
  lengths_R = np.where(has_eos_R, np.argmax(tokens_RT == eos_id, axis=1) + 1, length)
  counted_RT = np.arange(length)[None, :] < lengths_R[:, None]
  log_p_R = np.sum(np.where(counted_RT, token_log_probs_RT, 0.0), axis=1)
  return (log_p_R / ((5.0 + lengths_R) / 6.0) ** alpha).reshape(batch, beams)


def test_length_penalty_is_gnmt():
  np.testing.assert_allclose(length_penalty(1, 0.6), 1.0)
  np.testing.assert_allclose(length_penalty(7, 0.6), 2.0**0.6, rtol=1e-6)
  np.testing.assert_allclose(length_penalty(30, 0.0), 1.0)


def test_beam_of_one_without_penalty_is_greedy(copy_model, copy_sources):
  """With alpha > 0 a W = 1 search may keep going after greedy's EOS and finish better, so the
  equivalence holds for the plain log-probability ranking."""
  tokens_BWT, _ = beam_search(
    copy_model, copy_sources, beam_size=1, alpha=0.0, max_new_tokens=MAX_LENGTH
  )
  np.testing.assert_array_equal(
    tokens_BWT[:, 0], greedy_decode(copy_model, copy_sources, max_new_tokens=MAX_LENGTH)
  )


@pytest.fixture(scope="module")
def beams(copy_model, copy_sources):
  return beam_search(copy_model, copy_sources, beam_size=4, alpha=0.6, max_new_tokens=MAX_LENGTH)


def test_scores_equal_full_forward_log_prob_over_penalty(copy_model, copy_sources, beams):
  tokens_BWT, scores_BW = beams
  assert tokens_BWT.shape == (8, 4, MAX_LENGTH) and scores_BW.shape == (8, 4)
  np.testing.assert_allclose(
    scores_BW, full_forward_scores(copy_model, copy_sources, tokens_BWT, 0.6), atol=1e-4
  )


def test_hypotheses_are_distinct_sorted_and_eos_terminated(beams):
  tokens_BWT, scores_BW = (np.asarray(x) for x in beams)
  assert np.all(np.diff(scores_BW, axis=1) <= 1e-6), scores_BW
  for hypotheses_WT in tokens_BWT:
    assert len({tuple(row) for row in hypotheses_WT}) == len(hypotheses_WT)
    for row in hypotheses_WT:
      end = np.argmax(row == EOS_ID)
      assert row[end] == EOS_ID and np.all(row[:end] != PAD_ID) and np.all(row[end + 1 :] == PAD_ID)


def test_beam_of_four_scores_at_least_greedy(copy_model, copy_sources, beams):
  greedy_BT = greedy_decode(copy_model, copy_sources, max_new_tokens=MAX_LENGTH)
  greedy_B = full_forward_scores(copy_model, copy_sources, greedy_BT[:, None], 0.6)[:, 0]
  assert np.all(np.asarray(beams[1][:, 0]) >= greedy_B - 1e-5), (beams[1][:, 0], greedy_B)
  # The lightly trained model leaves room to improve: beam search does, on some sentences.
  assert np.any(np.asarray(beams[1][:, 0]) > greedy_B + 1e-3)


@pytest.mark.parametrize("eos_id", [4, 11])
def test_hypotheses_cut_off_at_max_length_are_ranked_with_the_finished(eos_id):
  """A random model and a short max_length leave finished and unfinished hypotheses side by
  side (this seed and these EOS ids make some finish); all of them come back best first by their
  score."""
  model = EncoderDecoder(TransformerConfig.tiny(tie_output=False), rngs=nnx.Rngs(6))
  src_BS = jnp.asarray(np.random.default_rng(0).integers(4, 64, (4, 6)), jnp.int32)
  tokens_BWT, scores_BW = beam_search(
    model, src_BS, beam_size=4, alpha=0.6, max_new_tokens=3, eos_id=eos_id
  )
  expected_BW = full_forward_scores(model, src_BS, tokens_BWT, 0.6, eos_id=eos_id)
  np.testing.assert_allclose(scores_BW, expected_BW, atol=1e-4)
  finished_BW = np.any(np.asarray(tokens_BWT) == eos_id, axis=2)
  assert np.any(finished_BW) and not np.all(finished_BW), finished_BW
  assert np.all(np.diff(expected_BW, axis=1) <= 1e-5), expected_BW
  np.testing.assert_allclose(expected_BW[:, 0], expected_BW.max(axis=1), atol=1e-6)


@pytest.mark.parametrize("batch, beam_size", [(1, 2), (2, 3)])
def test_lstm_beam_scores_equal_full_forward_log_prob_over_penalty(batch, beam_size):
  """The LSTM's recurrent state is its decoding cache: beam search must reorder it by beam.
  With 2 decoder layers, batch 1 x beam 2 gives as many rows as layers, where a state stored
  layers-first would be reordered along the wrong axis without any shape error."""
  config = RNNConfig(
    vocab_size=13, d_model=8, num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0
  )
  model = LSTMSeq2Seq(config, rngs=nnx.Rngs(0))
  model.eval()
  src_BS = jnp.array([[5, 6, 7, 8], [9, 10, 4, PAD_ID]], jnp.int32)[:batch]
  tokens_BWT, scores_BW = beam_search(
    model, src_BS, beam_size=beam_size, alpha=0.6, max_new_tokens=6
  )
  assert tokens_BWT.shape == (batch, beam_size, 6)
  expected_BW = full_forward_scores(model, src_BS, tokens_BWT, 0.6)
  np.testing.assert_allclose(scores_BW, expected_BW, atol=1e-4)
  assert np.all(np.diff(expected_BW, axis=1) <= 1e-5), expected_BW


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_in_chunks_equals_lax_top_k_ties_included(ties):
  """The beam step's top-k over [B, W V] reads a fraction of each row; values and indices
  (the lowest index first among equal values) are lax.top_k's."""
  rng = np.random.default_rng(int(ties))
  for width, k in [(32_000, 8), (8_000, 2), (1_000, 16), (513, 3), (40, 8)]:
    x = rng.normal(size=(3, width)).astype(np.float32)
    if ties:
      x = np.round(x)  # five distinct values: most of every top-k ties
      x[1, : width // 2] = NEG_INF
    expected = lax.top_k(jnp.asarray(x), k)
    got = top_k_in_chunks(jnp.asarray(x), k)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def reference_search(next_log_probs, beams: int, alpha: float, limit: int, stop: str):
  """The best hypothesis (tokens after BOS, EOS included where it ended; score) of one sentence
  by the search the module docstring describes, written over Python lists: `next_log_probs(
  prefix)` gives the float64 log-probabilities of the token after BOS + prefix."""
  lp = lambda length: ((5.0 + length) / 6.0) ** alpha
  alive, finished, t = [((), 0.0)], [], 0
  while True:
    candidates = [
      (log_p + step_log_p, w, token)
      for w, (tokens, log_p) in enumerate(alive)
      for token, step_log_p in enumerate(next_log_probs(tokens))
      if token != PAD_ID
    ]
    top = sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))[: 2 * beams]
    finished += [
      (alive[w][0] + (token,), s / lp(t + 1)) for s, w, token in top[:beams] if token == EOS_ID
    ]
    finished = sorted(finished, key=lambda f: -f[1])[:beams]
    alive = [(alive[w][0] + (token,), s) for s, w, token in top if token != EOS_ID][:beams]
    t += 1
    if t >= limit:
      scored = finished + [(tokens, log_p / lp(limit)) for tokens, log_p in alive]
      return max(scored, key=lambda f: f[1])
    ends_at = t + 1 if stop == "heuristic" else limit
    if finished and finished[0][1] > alive[0][1] / lp(ends_at):
      return finished[0]


@pytest.mark.parametrize("stop", ["heuristic", "exact"])
@pytest.mark.parametrize("alpha", [1.0, 5.0])
def test_each_stop_rule_finds_what_a_list_search_with_it_finds(
  copy_model, copy_sources, stop, alpha
):
  """Per sentence, the search returns the best hypothesis of a plain Python search by the same
  stop rule over a full forward pass per prefix."""
  src_BS = np.asarray(copy_sources)
  forward = nnx.jit(lambda model, src_1S, tgt_in_1T: model(src_1S, tgt_in_1T))

  def next_log_probs(b):
    def of(prefix):
      # Padded to one length (one compilation): position len(prefix) sees only what precedes it.
      tgt_in_1T = np.full((1, MAX_LENGTH), PAD_ID)
      tgt_in_1T[0, : len(prefix) + 1] = [BOS_ID, *prefix]
      logits_1TV = forward(copy_model, jnp.asarray(src_BS[b : b + 1]), jnp.asarray(tgt_in_1T))
      return numpy_log_softmax(logits_1TV)[0, len(prefix)]

    return of

  tokens_BKT, scores_BK = beam_search(
    copy_model,
    copy_sources,
    beam_size=4,
    alpha=alpha,
    max_new_tokens=MAX_LENGTH,
    num_results=1,
    stop=stop,
  )
  for b in range(len(src_BS)):
    tokens, score = reference_search(next_log_probs(b), 4, alpha, MAX_LENGTH, stop)
    row = [int(x) for x in np.asarray(tokens_BKT[b, 0])]
    assert row[: len(tokens)] == list(tokens) and set(row[len(tokens) :]) <= {PAD_ID}, b
    np.testing.assert_allclose(scores_BK[b, 0], score, atol=1e-4)


def test_the_stop_rules_part_where_a_longer_hypothesis_wins_late(copy_model, copy_sources):
  """A strong length penalty lifts long hypotheses: the exact rule waits for them where the
  heuristic has stopped, so the rules' agreement with the list search above is not one
  agreement twice."""
  best = {
    stop: np.asarray(
      beam_search(
        copy_model,
        copy_sources,
        beam_size=4,
        alpha=5.0,
        max_new_tokens=MAX_LENGTH,
        num_results=1,
        stop=stop,
      )[0][:, 0]
    )
    for stop in ("heuristic", "exact")
  }
  assert np.any(best["heuristic"] != best["exact"])
