"""Greedy decoding of the encoder-decoder, with the KV cache or by recomputing the prefix.

Each step appends argmax_y p(y | source, y_<t). Both modes run one `jax.lax.while_loop` over a
fixed [B, max_new_tokens + 1] token buffer (BOS first), so one compilation serves every batch of one
shape, and the loop stops as soon as every row has emitted EOS.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from transformer.baselines.rnn import LSTMSeq2Seq
from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decode.cache import call_cached, jit_with_model, split_cache
from transformer.errors import UserError
from transformer.model.transformer import EncoderDecoder

# The models greedy decoding drives: the Transformer and the LSTM baseline share its interface.
Seq2Seq = EncoderDecoder | LSTMSeq2Seq

# Finite stand-in for -inf (as in Flax's beam search): NEG_INF + log p stays finite and ordered.
NEG_INF = -1.0e7

# next_token(tokens_BT, t, carry) -> (token_B, carry): the token at position t + 1.
NextToken = Callable[[Int[Array, "B T"], Int[Array, ""], object], tuple[Int[Array, " B"], object]]


def log_probs_without_pad(logits_XV: Float[Array, "... V"], pad_id: int) -> Float[Array, "... V"]:
  """log softmax(logits), with PAD made unreachable.

  PAD is never a real target: emitted, it would be indistinguishable from the padding after EOS,
  and recompute mode would hide it from attention while the cache would not. Its probability
  mass stays in the normaliser, so the other entries are the model's true log-probabilities.
  """
  log_probs_XV = jax.nn.log_softmax(logits_XV.astype(jnp.float32), axis=-1)
  return log_probs_XV.at[..., pad_id].set(NEG_INF)


def token_loop(
  next_token: NextToken,
  tokens_BT: Int[Array, "B T"],
  start: int,
  carry,
  *,
  pad_id: int,
  eos_id: int | None,
  done_B: Bool[Array, " B"] | None = None,
  limit_B: Int[Array, " B"] | None = None,
) -> Int[Array, "B T"]:
  """Fills tokens_BT[:, start + 1:] one position per step; rows that emitted EOS get PAD.

  `done_B` marks rows already finished; `limit_B`, the position after which a row gets no more
  tokens (its own length limit). Stops after the last position or once every row is done
  (`eos_id=None`: no row ends at a token).
  """
  length = tokens_BT.shape[1]
  if done_B is None:
    done_B = jnp.zeros(tokens_BT.shape[:1], jnp.bool_)

  def unfinished(state):
    t, _, done_B, _ = state
    return (t < length - 1) & ~jnp.all(done_B)

  def step(state):
    t, tokens_BT, done_B, carry = state
    token_B, carry = next_token(tokens_BT, t, carry)
    token_B = jnp.where(done_B, pad_id, token_B)
    tokens_BT = lax.dynamic_update_slice_in_dim(tokens_BT, token_B[:, None], t + 1, axis=1)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    if limit_B is not None:
      done_B = done_B | (t + 1 >= limit_B)
    return t + 1, tokens_BT, done_B, carry

  state = (jnp.asarray(start, jnp.int32), tokens_BT, done_B, carry)
  return lax.while_loop(unfinished, step, state)[1]


def start_tokens(batch_size: int, length: int, bos_id: int, pad_id: int) -> Int[Array, "B T"]:
  """[B, length]: BOS, then PAD to be overwritten."""
  return jnp.full((batch_size, length), pad_id, jnp.int32).at[:, 0].set(bos_id)


def _cached_next_token(model: Seq2Seq, memory_BSD, src_ids_BS, max_new_tokens: int):
  """Feeds position t only; keys/values of positions < t come from the cache."""
  model.init_cache(memory_BSD, src_ids_BS, max_new_tokens)
  graphdef, cache, rest = split_cache(model)
  pad_id = model.config.pad_id

  def next_token(tokens_BT, t, cache):
    ids_B1 = lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1)
    step = lambda m: m.decode(ids_B1, use_cache=True)
    logits_B1V, cache = call_cached(graphdef, cache, rest, step)
    return jnp.argmax(log_probs_without_pad(logits_B1V[:, 0], pad_id), axis=-1), cache

  return next_token, cache


def _recomputing_next_token(model: Seq2Seq, memory_BSD, src_ids_BS, max_new_tokens: int):
  """Runs the decoder over the whole [B, max_new_tokens] window every step (the no-cache baseline).

  Fixed shapes keep it one compilation; causal masking makes positions after t irrelevant to the
  logits at t, so this equals decoding the prefix alone, at the cost of a full window per step.
  """
  pad_id = model.config.pad_id

  def next_token(tokens_BT, t, carry):
    logits_BTV = model.decode(tokens_BT[:, :max_new_tokens], memory_BSD, src_ids_BS)
    logits_BV = lax.dynamic_index_in_dim(logits_BTV, t, axis=1, keepdims=False)
    return jnp.argmax(log_probs_without_pad(logits_BV, pad_id), axis=-1), carry

  return next_token, ()


@jit_with_model(static_argnames=("max_new_tokens", "use_cache", "bos_id", "eos_id"))
def _greedy_decode(
  model: Seq2Seq,
  src_ids_BS,
  max_new_tokens_B,
  *,
  max_new_tokens: int,
  use_cache: bool,
  bos_id: int,
  eos_id: int,
):
  memory_BSD = model.encode(src_ids_BS)
  make_next_token = _cached_next_token if use_cache else _recomputing_next_token
  next_token, carry = make_next_token(model, memory_BSD, src_ids_BS, max_new_tokens)
  pad_id = model.config.pad_id
  tokens_BT = start_tokens(src_ids_BS.shape[0], max_new_tokens + 1, bos_id, pad_id)
  tokens_BT = token_loop(
    next_token, tokens_BT, 0, carry, pad_id=pad_id, eos_id=eos_id, limit_B=max_new_tokens_B
  )
  return tokens_BT[:, 1:]


def greedy_decode(
  model: Seq2Seq,
  src_ids_BS: Int[Array, "B S"],
  *,
  max_new_tokens: int,
  use_cache: bool = True,
  max_new_tokens_B: Int[Array, " B"] | None = None,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
) -> Int[Array, "B T"]:
  """Greedy translation of a batch of (PAD-padded) sources.

  Args:
    model: an encoder-decoder (`EncoderDecoder`, or the LSTM baseline with the same decoding
      interface); it is not modified (decoding runs on a copy, in eval mode).
    src_ids_BS: source ids [B, S], padded with `config.pad_id`.
    max_new_tokens: T, the most tokens generated per row (at most `config.max_len`).
    max_new_tokens_B: each row's own limit (<= T; default T for every one).
    use_cache: True: feed one position per step with the KV cache; False: recompute the
      decoder over the whole window every step (the baseline the cache is measured against).
    bos_id, eos_id: the decoder's start token and the end-of-sentence token.

  Returns:
    tokens [B, max_new_tokens] after BOS: each row ends with EOS then PAD, or has its limit of
    tokens without EOS (then PAD) if it did not finish.
  """
  if not 1 <= max_new_tokens <= model.config.max_len:
    raise UserError(
      f"max_new_tokens={max_new_tokens} must be in [1, model.max_len={model.config.max_len}]"
    )
  if max_new_tokens_B is None:
    max_new_tokens_B = jnp.full(src_ids_BS.shape[:1], max_new_tokens, jnp.int32)
  return _greedy_decode(
    model,
    src_ids_BS,
    jnp.minimum(jnp.asarray(max_new_tokens_B, jnp.int32), max_new_tokens),
    max_new_tokens=max_new_tokens,
    use_cache=use_cache,
    bos_id=bos_id,
    eos_id=eos_id,
  )
