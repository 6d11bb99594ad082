"""Beam search with the GNMT length penalty (Section 6.1: beam 4, alpha 0.6), using the KV cache.

The design follows Flax's examples/wmt/decode.py. Per source sentence it keeps W *alive*
hypotheses (highest log-probability, no EOS yet) and the W best *finished* ones (ended by EOS,
ranked by log p / lp(length)). Each step expands every alive hypothesis over the vocabulary and
takes the top 2W continuations: the best W without EOS stay alive (at most W of the 2W end in EOS,
so there are always W), and those of the top W that end in EOS are merged into the finished set.
(Flax's example also finishes EOS continuations ranked W+1..2W; leaving them out makes a search
with W = 1 and alpha = 0 exactly greedy.) The search stops early once no alive hypothesis can
still beat the worst finished one. It returns the W best of both sets by the same score, best
first: an alive hypothesis cut off at max_new_tokens may outrank a finished one, and is kept then
(Flax and tensor2tensor instead return alive ones only where nothing finished).

The model sees R = B * W rows: the memory and source are encoded once and repeated per beam
(row b * W + w is beam w of sentence b); after each step the self-attention cache rows are
gathered from the chosen parent beams.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decode.cache import call_cached, gather_beams, jit_with_model, split_cache
from transformer.decode.greedy import NEG_INF, log_probs_without_pad, start_tokens
from transformer.errors import UserError
from transformer.model.transformer import EncoderDecoder


def length_penalty(length: int | Array, alpha: float) -> Float[Array, ""]:
  """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al., 2016); |Y| counts the tokens with EOS."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class BeamState(NamedTuple):
  """The while-loop carry. t: position fed next; T here is max_new_tokens + 1 (BOS included)."""

  t: Int[Array, ""]
  alive_tokens_BWT: Int[Array, "B W T"]
  alive_log_probs_BW: Float[Array, "B W"]  # sorted, best first
  finished_tokens_BWT: Int[Array, "B W T"]
  finished_scores_BW: Float[Array, "B W"]  # log p / lp(length), sorted, best first
  finished_BW: Bool[Array, "B W"]  # False: an empty slot (score NEG_INF)
  cache: nnx.State  # step cache, R = B * W rows


def _take_beams(x_BW_, beam_BJ: Int[Array, "B J"]):
  """x[b, beam[b, j]] for every b, j; trailing dimensions follow."""
  index = beam_BJ.reshape(beam_BJ.shape + (1,) * (x_BW_.ndim - 2))
  return jnp.take_along_axis(x_BW_, index, axis=1)


def _top_beams(key_BJ: Float[Array, "B J"], k: int, *arrays):
  """The k entries with the highest key per row, best first, from each [B, J, ...] array."""
  _, index_Bk = lax.top_k(key_BJ, k)
  return [_take_beams(x, index_Bk) for x in arrays]


def _search_can_stop(state: BeamState, max_new_tokens: int, alpha: float) -> Bool[Array, ""]:
  """True when, for every sentence, W hypotheses have finished and none alive can beat them.

  An alive hypothesis only loses log-probability as it grows, and its penalty is at most
  lp(max_new_tokens), so log p / lp(max_new_tokens) bounds the score it could still finish with.
  """
  best_possible_B = state.alive_log_probs_BW[:, 0] / length_penalty(max_new_tokens, alpha)
  worst_finished_B = jnp.min(state.finished_scores_BW, axis=1)
  settled_B = jnp.all(state.finished_BW, axis=1) & (worst_finished_B > best_possible_B)
  return jnp.all(settled_B)


def _beam_step(
  state: BeamState, log_probs_BWV: Float[Array, "B W V"], cache, *, alpha: float, eos_id: int
) -> BeamState:
  """Extends the alive beams by one token given each beam's next-token log-probabilities."""
  batch, beams, vocab = log_probs_BWV.shape
  t = state.t
  # Every continuation of every alive beam, scored by its total log-probability.
  total_BWV = state.alive_log_probs_BW[:, :, None] + log_probs_BWV
  log_probs_B2W, flat_B2W = lax.top_k(total_BWV.reshape(batch, beams * vocab), 2 * beams)
  parent_B2W, token_B2W = flat_B2W // vocab, flat_B2W % vocab
  tokens_B2WT = _take_beams(state.alive_tokens_BWT, parent_B2W)
  tokens_B2WT = lax.dynamic_update_slice_in_dim(tokens_B2WT, token_B2W[:, :, None], t + 1, axis=2)
  eos_B2W = token_B2W == eos_id
  # A hypothesis finishes when its EOS ranks among the top W, as a W-best search would keep it;
  # EOS ranked W+1..2W is dropped. Then W = 1 with alpha = 0 is exactly greedy decoding.
  ended_B2W = eos_B2W & (jnp.arange(2 * beams) < beams)[None, :]

  # Alive: the best W continuations that do not end in EOS.
  alive_key_B2W = jnp.where(eos_B2W, NEG_INF, log_probs_B2W)
  alive_tokens, alive_log_probs, alive_parent_BW = _top_beams(
    alive_key_B2W, beams, tokens_B2WT, alive_key_B2W, parent_B2W
  )

  # Finished: the best W of the old finished set and the continuations that just ended.
  scores_B2W = jnp.where(ended_B2W, log_probs_B2W / length_penalty(t + 1, alpha), NEG_INF)
  scores_B3W = jnp.concatenate([state.finished_scores_BW, scores_B2W], axis=1)
  finished_tokens, finished_scores, finished = _top_beams(
    scores_B3W,
    beams,
    jnp.concatenate([state.finished_tokens_BWT, tokens_B2WT], axis=1),
    scores_B3W,
    jnp.concatenate([state.finished_BW, ended_B2W], axis=1),
  )
  return BeamState(
    t + 1,
    alive_tokens,
    alive_log_probs,
    finished_tokens,
    finished_scores,
    finished,
    gather_beams(cache, alive_parent_BW),
  )


def _final_beams(state: BeamState, max_new_tokens: int, alpha: float):
  """The W best of the finished and the alive hypotheses, by score, best first.

  Alive hypotheses compete only when the loop ran to max_new_tokens, so they all have max_new_tokens
  tokens and are scored with that length's penalty. When the search stopped early, every alive
  one is bounded by the worst finished score (`_search_can_stop`), so the finished set wins.
  Empty finished slots score NEG_INF and lose to any alive hypothesis; on a tie, finished first.
  """
  beams = state.finished_BW.shape[1]
  alive_scores_BW = state.alive_log_probs_BW / length_penalty(max_new_tokens, alpha)
  scores_B2W = jnp.concatenate([state.finished_scores_BW, alive_scores_BW], axis=1)
  tokens_B2WT = jnp.concatenate([state.finished_tokens_BWT, state.alive_tokens_BWT], axis=1)
  tokens_BWT, scores_BW = _top_beams(scores_B2W, beams, tokens_B2WT, scores_B2W)
  return tokens_BWT, scores_BW


@jit_with_model(static_argnames=("beam_size", "alpha", "max_new_tokens", "bos_id", "eos_id"))
def _beam_search(
  model: EncoderDecoder,
  src_ids_BS,
  *,
  beam_size: int,
  alpha: float,
  max_new_tokens: int,
  bos_id: int,
  eos_id: int,
):
  batch, beams, pad_id = src_ids_BS.shape[0], beam_size, model.config.pad_id
  # Encode once; beam w of sentence b is row b * W + w.
  memory_RSD = jnp.repeat(model.encode(src_ids_BS), beams, axis=0)
  model.init_cache(memory_RSD, jnp.repeat(src_ids_BS, beams, axis=0), max_new_tokens)
  graphdef, cache, rest = split_cache(model)

  def step(state: BeamState) -> BeamState:
    ids_R1 = lax.dynamic_slice_in_dim(state.alive_tokens_BWT, state.t, 1, axis=2)
    ids_R1 = ids_R1.reshape(batch * beams, 1)
    decode = lambda m: m.decode(ids_R1, use_cache=True)
    logits_R1V, cache = call_cached(graphdef, state.cache, rest, decode)
    log_probs_BWV = log_probs_without_pad(logits_R1V[:, 0], pad_id).reshape(batch, beams, -1)
    return _beam_step(state, log_probs_BWV, cache, alpha=alpha, eos_id=eos_id)

  def unfinished(state: BeamState):
    return (state.t < max_new_tokens) & ~_search_can_stop(state, max_new_tokens, alpha)

  tokens_BWT = start_tokens(batch * beams, max_new_tokens + 1, bos_id, pad_id)
  tokens_BWT = tokens_BWT.reshape(batch, beams, max_new_tokens + 1)
  # Only beam 0 starts alive, so the first step does not pick W copies of one continuation.
  alive_log_probs_BW = jnp.tile(jnp.array([[0.0] + [NEG_INF] * (beams - 1)]), (batch, 1))
  state = BeamState(
    jnp.asarray(0, jnp.int32),
    tokens_BWT,
    alive_log_probs_BW,
    tokens_BWT,
    jnp.full((batch, beams), NEG_INF),
    jnp.zeros((batch, beams), jnp.bool_),
    cache,
  )
  tokens_BWT, scores_BW = _final_beams(
    lax.while_loop(unfinished, step, state), max_new_tokens, alpha
  )
  return tokens_BWT[:, :, 1:], scores_BW


def beam_search(
  model: EncoderDecoder,
  src_ids_BS: Int[Array, "B S"],
  *,
  max_new_tokens: int,
  beam_size: int = 4,
  alpha: float = 0.6,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
) -> tuple[Int[Array, "B W T"], Float[Array, "B W"]]:
  """The W best translations of each source sentence, best first.

  Args:
    model: the encoder-decoder; it is not modified (decoding runs on a copy, in eval mode).
    src_ids_BS: source ids [B, S], padded with `config.pad_id`.
    max_new_tokens: T, the most tokens per hypothesis (at most `config.max_len`).
    beam_size: W (4 in the paper).
    alpha: length penalty exponent (0.6 in the paper; 0 ranks by plain log-probability).
    bos_id, eos_id: the decoder's start token and the end-of-sentence token.

  Returns:
    tokens [B, W, max_new_tokens] after BOS (EOS-terminated, then PAD; a hypothesis without EOS
    fills max_new_tokens), and scores [B, W] = log p(tokens | source) / lp(length), where length
    counts the tokens up to and including EOS (max_new_tokens for unfinished ones). Slot 0 holds
    the best score; finished and unfinished hypotheses are ranked together by this score.
  """
  if not 1 <= max_new_tokens <= model.config.max_len:
    raise UserError(
      f"max_new_tokens={max_new_tokens} must be in [1, model.max_len={model.config.max_len}]"
    )
  # 2W candidates per step must come from real tokens of beam 0 on the first step (PAD excluded).
  if beam_size < 1 or 2 * beam_size >= model.config.vocab_size:
    raise UserError(f"beam_size={beam_size} must be >= 1 and below vocab_size / 2")
  return _beam_search(
    model,
    src_ids_BS,
    beam_size=beam_size,
    alpha=float(alpha),
    max_new_tokens=max_new_tokens,
    bos_id=bos_id,
    eos_id=eos_id,
  )
