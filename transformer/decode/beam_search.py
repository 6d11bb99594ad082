"""Beam search with the GNMT length penalty (Section 6.1: beam 4, alpha 0.6), using the KV cache.

The design follows Flax's examples/wmt/decode.py. Per source sentence it keeps W *alive*
hypotheses (highest log-probability, no EOS yet) and the W best *finished* ones (ended by EOS,
ranked by log p / lp(length)). Each step expands every alive hypothesis over the vocabulary and
takes the top 2W continuations: the best W without EOS stay alive (at most W of the 2W end in EOS,
so there are always W), and those of the top W that end in EOS are merged into the finished set.
(Flax's example also finishes EOS continuations ranked W+1..2W; leaving them out makes a search
with W = 1 and alpha = 0 exactly greedy.) It returns the K <= W best of both sets by the same
score, best first: an alive hypothesis cut off at its length limit may outrank a finished one,
and is kept then (Flax and tensor2tensor instead return alive ones only where nothing finished).

Each sentence stops on its own (`_settled`), once K hypotheses have finished and no alive one is
expected to beat the K-th of them, or its hypotheses reached its own length limit. From then on
its entries are frozen while the others go on; the loop ends when every sentence has stopped. A
translation needs K = 1, which stops far earlier than K = W. What "expected" means is the `stop`
rule (`STOP_RULES`):
  * "heuristic": the best alive hypothesis would not beat it even if it ended with its next token
    at no cost (Hugging Face's `early_stopping=False`). It may lose a longer hypothesis that the
    length penalty would have lifted above the finished ones.
  * "exact": no alive hypothesis could beat it at any length up to the limit (tensor2tensor's rule,
    as the paper's search ran): the K best are then certain. With alpha = 1 a sentence runs about
    twice the steps of its translation; on Multi30k's validation split "heuristic" keeps 989 of
    1,014 translations, BLEU 30.96 against 30.98, in 63% of the CPU time.
With alpha = 0 (greedy included) both stop at the same step.

How the model sees the W hypotheses of a sentence depends on the model:
  * the Transformer (`EncoderDecoder`) keeps one cache row per sentence and feeds the W beams as
    W queries at the same position. Its self-attention cache holds W slots per position (slot
    s * W + x: position s of the hypothesis that beam x held at step s); a table of ancestors
    (`ancestors_BWT[b, w, s]` = the beam whose slot holds position s of beam w's hypothesis)
    masks each beam to its own history. Choosing parents then moves a [B, W, T] table of ints
    instead of the whole cache, and the encoder output is stored once per sentence, not W times.
  * other models (the LSTM baseline) get R = B * W rows, row b * W + w for beam w of sentence b,
    and their cache rows are gathered from the chosen parents after each step (`gather_beams`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decode.cache import call_cached, gather_beams, jit_with_model, split_cache
from transformer.decode.config import check_stop
from transformer.decode.greedy import NEG_INF, log_probs_without_pad, start_tokens
from transformer.errors import UserError
from transformer.model.transformer import EncoderDecoder


def length_penalty(length: int | Array, alpha: float) -> Float[Array, "*L"]:
  """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al., 2016); |Y| counts the tokens with EOS.
  `length` is a number or an array of them (one per sentence)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class BeamState(NamedTuple):
  """The search of B sentences (the while-loop carry); T here is max_new_tokens + 1 (BOS first).

  Each sentence has its own step: t_B[b] tokens follow BOS in its hypotheses, and position
  t_B[b] is fed next. A settled sentence keeps its entries until a caller replaces them.
  """

  t_B: Int[Array, " B"]
  alive_tokens_BWT: Int[Array, "B W T"]
  alive_log_probs_BW: Float[Array, "B W"]  # sorted, best first
  finished_tokens_BWT: Int[Array, "B W T"]
  finished_scores_BW: Float[Array, "B W"]  # log p / lp(length), sorted, best first
  finished_BW: Bool[Array, "B W"]  # False: an empty slot (score NEG_INF)
  settled_B: Bool[Array, " B"]  # the sentence's K best are final: its entries stay as they are
  limit_B: Int[Array, " B"]  # the most tokens of the sentence's hypotheses
  ancestors_BWT: Int[Array, "B W T"]  # T = max_new_tokens positions (see the module docstring)
  cache: nnx.State  # the model's step cache


def initial_state(
  limit_B: Int[Array, " B"], beams: int, max_new_tokens: int, cache, *, bos_id: int, pad_id: int
) -> BeamState:
  """Every sentence at its start: beam 0 alive with BOS (only it: the first step must not pick
  W copies of one continuation), nothing finished."""
  batch = limit_B.shape[0]
  tokens_BT = start_tokens(batch * beams, max_new_tokens + 1, bos_id, pad_id)
  tokens_BWT = tokens_BT.reshape(batch, beams, max_new_tokens + 1)
  return BeamState(
    jnp.zeros((batch,), jnp.int32),
    tokens_BWT,
    jnp.tile(jnp.array([[0.0] + [NEG_INF] * (beams - 1)]), (batch, 1)),
    tokens_BWT,
    jnp.full((batch, beams), NEG_INF, jnp.float32),  # not weakly typed: as the steps leave it
    jnp.zeros((batch, beams), jnp.bool_),
    jnp.zeros((batch,), jnp.bool_),
    limit_B.astype(jnp.int32),
    jnp.broadcast_to(jnp.arange(beams)[None, :, None], (batch, beams, max_new_tokens)),
    cache,
  )


def _take_beams(x_BW_, beam_BJ: Int[Array, "B J"]):
  """x[b, beam[b, j]] for every b, j; trailing dimensions follow."""
  index = beam_BJ.reshape(beam_BJ.shape + (1,) * (x_BW_.ndim - 2))
  return jnp.take_along_axis(x_BW_, index, axis=1)


def top_k_in_chunks(
  x_BJ: Float[Array, "B J"], k: int
) -> tuple[Float[Array, "B k"], Int[Array, "B k"]]:
  """`lax.top_k(x, k)` of long rows, ties included, from a fraction of them.

  The rows are cut into chunks of c; the k elements with the highest values lie in the k chunks
  with the highest maxima (were one outside them, each of those k chunks would hold an element
  ranked before it: higher, or equal and at a lower index). So a top-k over the chunks' maxima,
  then over those k chunks' elements, in index order so that ties still go to the lowest index,
  reads J / c + k c elements where a sort-based top-k orders J (XLA:CPU's TopK costs in
  proportion to J: the beam step's [B, W V] took as long as the output projection).
  """
  batch, width = x_BJ.shape
  chunk = 2 ** round(math.log2(math.sqrt(width / k)))
  if width < 4 * k * chunk:
    values_Bk, index_Bk = lax.top_k(x_BJ, k)
    return values_Bk, index_Bk
  chunks = -(-width // chunk)
  padded_BJ = jnp.pad(x_BJ, ((0, 0), (0, chunks * chunk - width)), constant_values=-jnp.inf)
  x_BCc = padded_BJ.reshape(batch, chunks, chunk)
  _, best_Bk = lax.top_k(jnp.max(x_BCc, axis=2), k)
  best_Bk = jnp.sort(best_Bk, axis=1)
  candidates_Bkc = jnp.take_along_axis(x_BCc, best_Bk[:, :, None], axis=1)
  values_Bk, at_Bk = lax.top_k(candidates_Bkc.reshape(batch, k * chunk), k)
  index_Bk = jnp.take_along_axis(best_Bk, at_Bk // chunk, axis=1) * chunk + at_Bk % chunk
  return values_Bk, index_Bk


def _top_beams(key_BJ: Float[Array, "B J"], k: int, *arrays):
  """The k entries with the highest key per row, best first, from each [B, J, ...] array."""
  _, index_Bk = lax.top_k(key_BJ, k)
  return [_take_beams(x, index_Bk) for x in arrays]


def _settled(state: BeamState, alpha: float, num_results: int, stop: str) -> Bool[Array, " B"]:
  """Per sentence: whether its search ends here, by the `stop` rule.

  Either its hypotheses have its limit of tokens, or K have finished and the best alive one is
  not expected to beat the K-th. An alive hypothesis only loses log-probability as it grows;
  its penalty is lp(t + 1) if it ends with its next token ("heuristic") and at most lp(limit)
  ("exact": log p / lp(limit) bounds any score it could still finish with, and the score it
  would get when cut off at the limit).
  """
  ends_at_B = state.t_B + 1 if stop == "heuristic" else state.limit_B
  best_possible_B = state.alive_log_probs_BW[:, 0] / length_penalty(ends_at_B, alpha)
  kth = num_results - 1
  beaten_B = state.finished_BW[:, kth] & (state.finished_scores_BW[:, kth] > best_possible_B)
  return state.settled_B | (state.t_B >= state.limit_B) | beaten_B


def _beam_step(
  state: BeamState, log_probs_BWV: Float[Array, "B W V"], *, alpha: float, eos_id: int
) -> tuple[BeamState, Int[Array, "B W"]]:
  """Extends the alive beams of the unsettled sentences by one token given each beam's
  next-token log-probabilities; returns the new state (cache and `settled_B` as they were) and
  each new alive beam's parent."""
  batch, beams, vocab = log_probs_BWV.shape
  t_B11 = state.t_B[:, None, None]
  # Every continuation of every alive beam, scored by its total log-probability.
  total_BWV = state.alive_log_probs_BW[:, :, None] + log_probs_BWV
  log_probs_B2W, flat_B2W = top_k_in_chunks(total_BWV.reshape(batch, beams * vocab), 2 * beams)
  parent_B2W, token_B2W = flat_B2W // vocab, flat_B2W % vocab
  tokens_B2WT = _take_beams(state.alive_tokens_BWT, parent_B2W)
  new_position_11T = jnp.arange(tokens_B2WT.shape[2])[None, None, :] == t_B11 + 1
  tokens_B2WT = jnp.where(new_position_11T, token_B2W[:, :, None], tokens_B2WT)
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
  penalty_B1 = length_penalty(state.t_B + 1, alpha)[:, None]
  scores_B2W = jnp.where(ended_B2W, log_probs_B2W / penalty_B1, NEG_INF)
  scores_B3W = jnp.concatenate([state.finished_scores_BW, scores_B2W], axis=1)
  finished_tokens, finished_scores, finished = _top_beams(
    scores_B3W,
    beams,
    jnp.concatenate([state.finished_tokens_BWT, tokens_B2WT], axis=1),
    scores_B3W,
    jnp.concatenate([state.finished_BW, ended_B2W], axis=1),
  )
  # Beam w at position t + 1 writes its own slot; positions up to t are its parent's history.
  positions_11T = jnp.arange(state.ancestors_BWT.shape[2])[None, None, :]
  ancestors_BWT = jnp.where(
    positions_11T <= t_B11,
    _take_beams(state.ancestors_BWT, alive_parent_BW),
    jnp.arange(beams)[None, :, None],
  )
  new = state._replace(
    t_B=state.t_B + 1,
    alive_tokens_BWT=alive_tokens,
    alive_log_probs_BW=alive_log_probs,
    finished_tokens_BWT=finished_tokens,
    finished_scores_BW=finished_scores,
    finished_BW=finished,
    ancestors_BWT=ancestors_BWT,
  )
  # A settled sentence keeps its entries (its search ended); the others take the new ones.
  keep = lambda old, updated: jnp.where(
    state.settled_B.reshape((batch,) + (1,) * (old.ndim - 1)), old, updated
  )
  fields: dict[str, Any] = {
    name: keep(getattr(state, name), getattr(new, name))
    for name in BeamState._fields
    if name not in ("settled_B", "limit_B", "cache")
  }
  return new._replace(**fields), alive_parent_BW


def final_beams(state: BeamState, alpha: float, num_results: int):
  """The K best of the finished and the alive hypotheses, by score, best first: tokens
  [B, K, T] (BOS first) and scores [B, K].

  Alive hypotheses compete only where the search ran to the sentence's limit, with its penalty
  (their length); where it stopped earlier, K hypotheses had finished and the stop rule judged
  them the best (`_settled`). Empty finished slots score NEG_INF and lose to any alive
  hypothesis; on a tie, finished first.
  """
  alive_scores_BW = jnp.where(
    (state.t_B >= state.limit_B)[:, None],
    state.alive_log_probs_BW / length_penalty(state.limit_B, alpha)[:, None],
    NEG_INF,
  )
  scores_B2W = jnp.concatenate([state.finished_scores_BW, alive_scores_BW], axis=1)
  tokens_B2WT = jnp.concatenate([state.finished_tokens_BWT, state.alive_tokens_BWT], axis=1)
  tokens_BKT, scores_BK = _top_beams(scores_B2W, num_results, tokens_B2WT, scores_B2W)
  return tokens_BKT, scores_BK


def _next_log_probs(graphdef, cache, rest, state: BeamState, *, shared: bool, pad_id: int):
  """Log-probabilities [B, W, V] of the token after position t_B of every alive hypothesis."""
  batch, beams, _ = state.alive_tokens_BWT.shape
  ids_BW = jnp.take_along_axis(state.alive_tokens_BWT, state.t_B[:, None, None], axis=2)[..., 0]
  if shared:
    # Beam w sees, at every position s, the slot of its ancestor there (slot s * W + x).
    owner_1111 = jnp.arange(beams)[None, None, None, :]
    mask_B1WC = (state.ancestors_BWT[..., None] == owner_1111).reshape(batch, 1, beams, -1)
    positions_BW = jnp.broadcast_to(state.t_B[:, None], ids_BW.shape)
    decode = lambda m: m.decode(
      ids_BW, use_cache=True, cache_mask=mask_B1WC, tgt_positions_BT=positions_BW
    )
    logits_BWV, cache = call_cached(graphdef, cache, rest, decode)
  else:
    decode = lambda m: m.decode(ids_BW.reshape(batch * beams, 1), use_cache=True)
    logits_R1V, cache = call_cached(graphdef, cache, rest, decode)
    logits_BWV = logits_R1V.reshape(batch, beams, -1)
  return log_probs_without_pad(logits_BWV, pad_id), cache


def search_step(
  graphdef,
  rest,
  state: BeamState,
  *,
  alpha: float,
  eos_id: int,
  num_results: int,
  shared: bool,
  pad_id: int,
  stop: str,
) -> BeamState:
  """One step of every sentence's search: the model's next-token distribution for each alive
  hypothesis, the beams it leads to, and which sentences are settled now."""
  log_probs_BWV, cache = _next_log_probs(
    graphdef, state.cache, rest, state, shared=shared, pad_id=pad_id
  )
  state, parent_BW = _beam_step(state, log_probs_BWV, alpha=alpha, eos_id=eos_id)
  if not shared:
    cache = gather_beams(cache, parent_BW)
  state = state._replace(cache=cache)
  return state._replace(settled_B=_settled(state, alpha, num_results, stop))


def _start(model, src_ids_BS, beams: int, max_new_tokens: int):
  """(graphdef, step cache, rest) of the model prepared to decode W beams per source row."""
  if isinstance(model, EncoderDecoder):
    memory_BSD = model.encode(src_ids_BS)
    model.init_cache(memory_BSD, src_ids_BS, max_new_tokens, beams=beams)
  else:  # one row per beam: encode once, repeat per beam (row b * W + w)
    memory_RSD = jnp.repeat(model.encode(src_ids_BS), beams, axis=0)
    model.init_cache(memory_RSD, jnp.repeat(src_ids_BS, beams, axis=0), max_new_tokens)
  return split_cache(model)


@jit_with_model(
  static_argnames=(
    "beam_size",
    "alpha",
    "max_new_tokens",
    "num_results",
    "bos_id",
    "eos_id",
    "stop",
  )
)
def _beam_search(
  model,
  src_ids_BS,
  max_new_tokens_B,
  *,
  beam_size: int,
  alpha: float,
  max_new_tokens: int,
  num_results: int,
  bos_id: int,
  eos_id: int,
  stop: str,
):
  pad_id = model.config.pad_id
  graphdef, cache, rest = _start(model, src_ids_BS, beam_size, max_new_tokens)
  state = initial_state(
    max_new_tokens_B, beam_size, max_new_tokens, cache, bos_id=bos_id, pad_id=pad_id
  )
  step = lambda state: search_step(
    graphdef,
    rest,
    state,
    alpha=alpha,
    eos_id=eos_id,
    num_results=num_results,
    shared=isinstance(model, EncoderDecoder),
    pad_id=pad_id,
    stop=stop,
  )
  # Every sentence settles by its limit (<= max_new_tokens steps).
  state = lax.while_loop(lambda state: ~jnp.all(state.settled_B), step, state)
  tokens_BKT, scores_BK = final_beams(state, alpha, num_results)
  return tokens_BKT[:, :, 1:], scores_BK


def beam_search(
  model,
  src_ids_BS: Int[Array, "B S"],
  *,
  max_new_tokens: int,
  beam_size: int = 4,
  alpha: float = 0.6,
  num_results: int | None = None,
  max_new_tokens_B: Int[Array, " B"] | None = None,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
  stop: str = "heuristic",
) -> tuple[Int[Array, "B K T"], Float[Array, "B K"]]:
  """The K best translations of each source sentence, best first.

  Args:
    model: the encoder-decoder; it is not modified (decoding runs on a copy, in eval mode).
    src_ids_BS: source ids [B, S], padded with `config.pad_id`.
    max_new_tokens: T, the most tokens per hypothesis (at most `config.max_len`).
    beam_size: W (4 in the paper).
    alpha: length penalty exponent (0.6 in the paper; 0 ranks by plain log-probability).
    num_results: K <= W hypotheses returned (default W). The search of a sentence stops once
      its K best are certain, so K = 1 (a translation) runs fewer steps than K = W.
    max_new_tokens_B: each sentence's own limit (<= T; default T for every one).
    bos_id, eos_id: the decoder's start token and the end-of-sentence token.
    stop: "heuristic" or "exact", when a sentence's search ends (see the module docstring).

  Returns:
    tokens [B, K, T] after BOS (EOS-terminated, then PAD; a hypothesis without EOS has its
    sentence's limit of tokens), and scores [B, K] = log p(tokens | source) / lp(length), where
    length counts the tokens up to and including EOS (the limit for unfinished ones). Slot 0
    holds the best score; finished and unfinished hypotheses are ranked together by this score.
  """
  if not 1 <= max_new_tokens <= model.config.max_len:
    raise UserError(
      f"max_new_tokens={max_new_tokens} must be in [1, model.max_len={model.config.max_len}]"
    )
  # 2W candidates per step must come from real tokens of beam 0 on the first step (PAD excluded).
  if beam_size < 1 or 2 * beam_size >= model.config.vocab_size:
    raise UserError(f"beam_size={beam_size} must be >= 1 and below vocab_size / 2")
  check_stop(stop)
  num_results = beam_size if num_results is None else num_results
  if not 1 <= num_results <= beam_size:
    raise UserError(f"num_results={num_results} must be in [1, beam_size={beam_size}]")
  if max_new_tokens_B is None:
    max_new_tokens_B = jnp.full(src_ids_BS.shape[:1], max_new_tokens, jnp.int32)
  return _beam_search(
    model,
    src_ids_BS,
    jnp.minimum(jnp.asarray(max_new_tokens_B, jnp.int32), max_new_tokens),
    beam_size=beam_size,
    alpha=float(alpha),
    max_new_tokens=max_new_tokens,
    num_results=num_results,
    bos_id=bos_id,
    eos_id=eos_id,
    stop=stop,
  )
