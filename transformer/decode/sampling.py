"""Sampling from the decoder-only language model, with temperature, top-k and nucleus (top-p).

The prompt is fed in one call (prefill), filling the KV cache for all its positions; then one
token per step. Prompts in a batch must have equal length: decode-mode attention has no padding
mask, so a padded prompt would attend to its padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from transformer.data.tokenizer import EOS_ID
from transformer.decode.cache import call_cached, jit_with_model, split_cache
from transformer.decode.greedy import NEG_INF, log_probs_without_pad, token_loop
from transformer.errors import UserError
from transformer.model.transformer import DecoderOnly


def keep_top_k(logits_BV: Float[Array, "B V"], k: int) -> Float[Array, "B V"]:
  """Logits outside each row's k largest set to NEG_INF (ties with the k-th are kept)."""
  kth_B1 = lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV >= kth_B1, logits_BV, NEG_INF)


def keep_top_p(logits_BV: Float[Array, "B V"], p: float | Array) -> Float[Array, "B V"]:
  """Nucleus filtering (Holtzman et al., 2019): keep the most likely tokens whose total
  probability first reaches p (always at least the most likely one); the rest get NEG_INF.
  p >= 1 keeps every token: float32 cumulative sums can reach 1 before the last one."""
  sorted_BV = lax.top_k(logits_BV, logits_BV.shape[-1])[0]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # A token is kept while the mass of the tokens ranked above it is still below p.
  mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  smallest_kept_B1 = jnp.min(
    jnp.where(mass_above_BV < p, sorted_BV, jnp.inf), axis=-1, keepdims=True
  )
  filtered_BV = jnp.where(logits_BV >= smallest_kept_B1, logits_BV, NEG_INF)
  return jnp.where(jnp.asarray(p) >= 1.0, logits_BV, filtered_BV)


def choose_token(
  logits_BV: Float[Array, "B V"],
  key: Array,
  *,
  pad_id: int,
  temperature: float | Array,
  top_k: int | None,
  top_p: float | Array | None,
) -> Int[Array, " B"]:
  """One token per row from softmax(logits / temperature) restricted to top-k, then top-p.

  temperature == 0 takes the argmax (greedy). PAD is never chosen.
  """
  log_probs_BV = log_probs_without_pad(logits_BV, pad_id)
  greedy_B = jnp.argmax(log_probs_BV, axis=-1)
  # Any positive floor works: at temperature 0 the sample is discarded below.
  scaled_BV = log_probs_BV / jnp.maximum(temperature, 1e-6)
  if top_k is not None:
    scaled_BV = keep_top_k(scaled_BV, top_k)
  if top_p is not None:
    scaled_BV = keep_top_p(scaled_BV, top_p)
  sampled_B = jax.random.categorical(key, scaled_BV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B)


@jit_with_model(static_argnames=("max_new_tokens", "top_k", "eos_id"))
def _sample(
  model: DecoderOnly,
  prompt_ids_BT,
  rng,
  temperature,
  top_p,
  *,
  max_new_tokens: int,
  top_k: int | None,
  eos_id: int | None,
):
  batch, prompt_length = prompt_ids_BT.shape
  total = prompt_length + max_new_tokens
  choose = lambda logits_BV, t: choose_token(
    logits_BV,
    jax.random.fold_in(rng, t),
    pad_id=model.config.pad_id,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )

  # The last token is never fed back, so the cache needs one position less than the output.
  model.init_cache(batch, total - 1)
  graphdef, cache, rest = split_cache(model)
  prefill = lambda m: m(prompt_ids_BT, use_cache=True)
  logits_BTV, cache = call_cached(graphdef, cache, rest, prefill)
  first_B = choose(logits_BTV[:, -1], prompt_length - 1)
  # PAD where the loop writes nothing: it stops once every row has ended.
  ids_BT = jnp.full((batch, total), model.config.pad_id, jnp.int32)
  ids_BT = ids_BT.at[:, :prompt_length].set(prompt_ids_BT)
  ids_BT = ids_BT.at[:, prompt_length].set(first_B)

  def next_token(ids_BT, t, cache):
    ids_B1 = lax.dynamic_slice_in_dim(ids_BT, t, 1, axis=1)
    logits_B1V, cache = call_cached(graphdef, cache, rest, lambda m: m(ids_B1, use_cache=True))
    return choose(logits_B1V[:, 0], t), cache

  # Positions up to the prompt are not searched for EOS: only new tokens end a row.
  done_B = jnp.zeros((batch,), jnp.bool_) if eos_id is None else first_B == eos_id
  return token_loop(
    next_token,
    ids_BT,
    prompt_length,
    cache,
    pad_id=model.config.pad_id,
    eos_id=eos_id,
    done_B=done_B,
  )


def sample(
  model: DecoderOnly,
  prompt_ids_BT: Int[Array, "B T"],
  *,
  max_new_tokens: int,
  rng: Array,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  eos_id: int | None = EOS_ID,
) -> Int[Array, "B total"]:
  """Continues each prompt by up to `max_new_tokens` sampled tokens.

  Args:
    model: the decoder-only model; it is not modified (sampling runs on a copy, in eval mode).
    prompt_ids_BT: prompts [B, T], all of length T (no padding, see the module docstring).
    max_new_tokens: tokens to generate; T + max_new_tokens - 1 <= config.max_len.
    rng: a PRNG key; step t draws with fold_in(rng, t), so one key gives one result.
    temperature: divides the log-probabilities; 0 is greedy decoding.
    top_k: sample among the k most likely tokens only (1 is greedy).
    top_p: sample among the most likely tokens holding probability mass p (nucleus sampling).
    eos_id: a row ends at this token and is padded after it; None never stops early.

  Returns:
    ids [B, total = T + max_new_tokens]: the prompt, then the new tokens (PAD after EOS).
  """
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0:
    raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy)")
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise UserError(f"top_k={top_k} must be in [1, vocab_size={model.config.vocab_size}]")
  if top_p is not None and not 0 < top_p <= 1:
    raise UserError(f"top_p={top_p} must be in (0, 1]")
  return _sample(
    model,
    prompt_ids_BT,
    rng,
    temperature,
    top_p,
    max_new_tokens=max_new_tokens,
    top_k=top_k,
    eos_id=eos_id,
  )
