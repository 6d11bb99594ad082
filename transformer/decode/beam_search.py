"""Beam search with the GNMT length penalty (Section 6.1: beam 4, alpha 0.6), using the KV cache.

The design follows Flax's examples/wmt/decode.py. Per source sentence it keeps K *alive*
hypotheses (highest log-probability, no EOS yet) and the K best *finished* ones (ended by EOS,
ranked by log p / lp(length)). Each step expands every alive hypothesis over the vocabulary and
takes the top 2K continuations: the best K without EOS stay alive (at most K of the 2K end in EOS,
so there are always K), and those of the top K that end in EOS are merged into the finished set.
(Flax's example also finishes EOS continuations ranked K+1..2K; leaving them out makes a search
with K = 1 and alpha = 0 exactly greedy.) The search stops early once no alive hypothesis can
still beat the worst finished one.

The model sees R = B * K rows: the memory and source are encoded once and repeated per beam
(row b * K + k is beam k of sentence b); after each step the self-attention cache rows are
gathered from the chosen parent beams.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decode.cache import call_cached, gather_beams, jit_with_model, split_cache
from transformer.decode.greedy import NEG_INF, log_probs_without_pad, start_tokens
from transformer.model.transformer import EncoderDecoder


def length_penalty(length: int | Array, alpha: float) -> Float[Array, ""]:
  """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al., 2016); |Y| counts the tokens with EOS."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class BeamState(NamedTuple):
  """The while-loop carry. t: position fed next; T here is max_length + 1 (BOS included)."""
  t: Int[Array, ""]
  alive_tokens_BKT: Int[Array, "B K T"]
  alive_log_probs_BK: Float[Array, "B K"]     # sorted, best first
  finished_tokens_BKT: Int[Array, "B K T"]
  finished_scores_BK: Float[Array, "B K"]     # log p / lp(length), sorted, best first
  finished_BK: Bool[Array, "B K"]             # False: an empty slot (score NEG_INF)
  cache: object                               # step cache, R = B * K rows


def _take_beams(x_BK_, beam_BJ: Int[Array, "B J"]):
  """x[b, beam[b, j]] for every b, j; trailing dimensions follow."""
  index = beam_BJ.reshape(beam_BJ.shape + (1,) * (x_BK_.ndim - 2))
  return jnp.take_along_axis(x_BK_, index, axis=1)


def _top_beams(key_BJ: Float[Array, "B J"], k: int, *arrays):
  """The k entries with the highest key per row, best first, from each [B, J, ...] array."""
  _, index_Bk = lax.top_k(key_BJ, k)
  return [_take_beams(x, index_Bk) for x in arrays]


def _search_can_stop(state: BeamState, max_length: int, alpha: float) -> Bool[Array, ""]:
  """True when, for every sentence, K hypotheses have finished and none alive can beat them.

  An alive hypothesis only loses log-probability as it grows, and its penalty is at most
  lp(max_length), so log p / lp(max_length) bounds the score it could still finish with.
  """
  best_possible_B = state.alive_log_probs_BK[:, 0] / length_penalty(max_length, alpha)
  worst_finished_B = jnp.min(state.finished_scores_BK, axis=1)
  settled_B = jnp.all(state.finished_BK, axis=1) & (worst_finished_B > best_possible_B)
  return jnp.all(settled_B)


def _beam_step(state: BeamState, log_probs_BKV: Float[Array, "B K V"], cache, *, alpha: float,
               eos_id: int) -> BeamState:
  """Extends the alive beams by one token given each beam's next-token log-probabilities."""
  batch, beams, vocab = log_probs_BKV.shape
  t = state.t
  # Every continuation of every alive beam, scored by its total log-probability.
  total_BKV = state.alive_log_probs_BK[:, :, None] + log_probs_BKV
  log_probs_B2K, flat_B2K = lax.top_k(total_BKV.reshape(batch, beams * vocab), 2 * beams)
  parent_B2K, token_B2K = flat_B2K // vocab, flat_B2K % vocab
  tokens_B2KT = _take_beams(state.alive_tokens_BKT, parent_B2K)
  tokens_B2KT = lax.dynamic_update_slice_in_dim(tokens_B2KT, token_B2K[:, :, None], t + 1, axis=2)
  eos_B2K = token_B2K == eos_id
  # A hypothesis finishes when its EOS ranks among the top K, as a K-best search would keep it;
  # EOS ranked K+1..2K is dropped. Then K = 1 with alpha = 0 is exactly greedy decoding.
  ended_B2K = eos_B2K & (jnp.arange(2 * beams) < beams)[None, :]

  # Alive: the best K continuations that do not end in EOS.
  alive_key_B2K = jnp.where(eos_B2K, NEG_INF, log_probs_B2K)
  alive_tokens, alive_log_probs, alive_parent_BK = _top_beams(
      alive_key_B2K, beams, tokens_B2KT, alive_key_B2K, parent_B2K)

  # Finished: the best K of the old finished set and the continuations that just ended.
  scores_B2K = jnp.where(ended_B2K, log_probs_B2K / length_penalty(t + 1, alpha), NEG_INF)
  scores_B3K = jnp.concatenate([state.finished_scores_BK, scores_B2K], axis=1)
  finished_tokens, finished_scores, finished = _top_beams(
      scores_B3K, beams, jnp.concatenate([state.finished_tokens_BKT, tokens_B2KT], axis=1),
      scores_B3K, jnp.concatenate([state.finished_BK, ended_B2K], axis=1))
  return BeamState(t + 1, alive_tokens, alive_log_probs, finished_tokens, finished_scores,
                   finished, gather_beams(cache, alive_parent_BK))


def _final_beams(state: BeamState, max_length: int, alpha: float):
  """The finished hypotheses, best first; empty slots are filled with the best alive ones.

  Alive hypotheses are only left when the loop ran to max_length, so they all have max_length
  tokens and are scored with that length's penalty.
  """
  beams = state.finished_BK.shape[1]
  # Both sets are sorted best first and the finished slots come before the empty ones, so slot
  # j takes finished hypothesis j while there is one, else alive hypothesis j - num_finished.
  num_finished_B1 = jnp.sum(state.finished_BK, axis=1, keepdims=True)
  slot_1K = jnp.arange(beams)[None, :]
  from_alive_BK = jnp.clip(slot_1K - num_finished_B1, 0, beams - 1)
  use_finished_BK = slot_1K < num_finished_B1
  alive_tokens_BKT = _take_beams(state.alive_tokens_BKT, from_alive_BK)
  alive_scores_BK = (_take_beams(state.alive_log_probs_BK, from_alive_BK)
                     / length_penalty(max_length, alpha))
  tokens_BKT = jnp.where(use_finished_BK[:, :, None], state.finished_tokens_BKT, alive_tokens_BKT)
  scores_BK = jnp.where(use_finished_BK, state.finished_scores_BK, alive_scores_BK)
  return tokens_BKT, scores_BK


@jit_with_model(static_argnames=("beam_size", "alpha", "max_length", "bos_id", "eos_id"))
def _beam_search(model: EncoderDecoder, src_ids_BS, *, beam_size: int, alpha: float,
                 max_length: int, bos_id: int, eos_id: int):
  batch, beams, pad_id = src_ids_BS.shape[0], beam_size, model.config.pad_id
  # Encode once; beam k of sentence b is row b * K + k.
  memory_RSD = jnp.repeat(model.encode(src_ids_BS), beams, axis=0)
  model.init_cache(memory_RSD, jnp.repeat(src_ids_BS, beams, axis=0), max_length)
  graphdef, cache, rest = split_cache(model)

  def step(state: BeamState) -> BeamState:
    ids_R1 = lax.dynamic_slice_in_dim(state.alive_tokens_BKT, state.t, 1, axis=2)
    ids_R1 = ids_R1.reshape(batch * beams, 1)
    decode = lambda m: m.decode(ids_R1, None, None, decode=True)
    logits_R1V, cache = call_cached(graphdef, state.cache, rest, decode)
    log_probs_BKV = log_probs_without_pad(logits_R1V[:, 0], pad_id).reshape(batch, beams, -1)
    return _beam_step(state, log_probs_BKV, cache, alpha=alpha, eos_id=eos_id)

  def unfinished(state: BeamState):
    return (state.t < max_length) & ~_search_can_stop(state, max_length, alpha)

  tokens_BKT = start_tokens(batch * beams, max_length + 1, bos_id, pad_id)
  tokens_BKT = tokens_BKT.reshape(batch, beams, max_length + 1)
  # Only beam 0 starts alive, so the first step does not pick K copies of one continuation.
  alive_log_probs_BK = jnp.tile(jnp.array([[0.0] + [NEG_INF] * (beams - 1)]), (batch, 1))
  state = BeamState(jnp.asarray(0, jnp.int32), tokens_BKT, alive_log_probs_BK, tokens_BKT,
                    jnp.full((batch, beams), NEG_INF), jnp.zeros((batch, beams), jnp.bool_), cache)
  tokens_BKT, scores_BK = _final_beams(lax.while_loop(unfinished, step, state), max_length, alpha)
  return tokens_BKT[:, :, 1:], scores_BK


def beam_search(model: EncoderDecoder, src_ids_BS: Int[Array, "B S"], *, max_length: int,
                beam_size: int = 4, alpha: float = 0.6, bos_id: int = BOS_ID,
                eos_id: int = EOS_ID) -> tuple[Int[Array, "B K T"], Float[Array, "B K"]]:
  """The K best translations of each source sentence, best first.

  Args:
    model: the encoder-decoder; it is not modified (decoding runs on a copy, in eval mode).
    src_ids_BS: source ids [B, S], padded with `config.pad_id`.
    max_length: T, the most tokens per hypothesis (at most `config.max_len`).
    beam_size: K (4 in the paper).
    alpha: length penalty exponent (0.6 in the paper; 0 ranks by plain log-probability).
    bos_id, eos_id: the decoder's start token and the end-of-sentence token.

  Returns:
    tokens [B, K, max_length] after BOS (EOS-terminated, then PAD; a hypothesis without EOS
    fills max_length), and scores [B, K] = log p(tokens | source) / lp(length), where length
    counts the tokens up to and including EOS (max_length for unfinished ones). Finished
    hypotheses come before unfinished ones.
  """
  if not 1 <= max_length <= model.config.max_len:
    raise ValueError(f"max_length={max_length} must be in [1, model.max_len="
                     f"{model.config.max_len}]")
  # 2K candidates per step must come from real tokens of beam 0 on the first step (PAD excluded).
  if beam_size < 1 or 2 * beam_size >= model.config.vocab_size:
    raise ValueError(f"beam_size={beam_size} must be >= 1 and below vocab_size / 2")
  return _beam_search(model, src_ids_BS, beam_size=beam_size, alpha=float(alpha),
                      max_length=max_length, bos_id=bos_id, eos_id=eos_id)
