"""A batch of sources to translate: the padded length it gets, and the search that decodes it."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Int

from transformer.decode.beam_search import beam_search
from transformer.decode.greedy import greedy_decode


def padded_length(length: int, max_len: int) -> int:
  """`length` rounded up to a multiple of 8 (few distinct shapes, few compilations), but never
  past `max_len`, the longest sequence the model has positions for."""
  return min(-(-length // 8) * 8, max(length, max_len))


def search_length(length: int, max_len: int) -> int:
  """The source length a search is compiled for: `length` rounded up to a power of two (at least
  8), never past `max_len`. Coarser than `padded_length`: a search compiles three programs per
  source length (`transformer.decode.engine`), and lists whose longest sentences differ a little
  (two test sets, one sentence after another) then share them; the extra padding costs little,
  the source being encoded once per sentence."""
  return min(max(8, 1 << (length - 1).bit_length()), max(length, max_len))


def length_limits(
  src_ids_BS: Int[Array, "B S"], max_extra_tokens: int, max_new_tokens: int, pad_id: int
) -> Int[Array, " B"]:
  """Each sentence's most target tokens: its own source length (EOS included) plus
  `max_extra_tokens`, within `max_new_tokens`; 1 for an all-padding row, so that it is done at
  once. A sentence's translation then does not depend on the batch it is in."""
  lengths_B = jnp.sum(src_ids_BS != pad_id, axis=1)
  limits_B = jnp.minimum(lengths_B + max_extra_tokens, max_new_tokens)
  return jnp.where(lengths_B > 0, limits_B, 1).astype(jnp.int32)


def translate_ids(
  model,
  src_ids_BS: Int[Array, "B S"],
  *,
  beam_size: int,
  alpha: float,
  max_extra_tokens: int,
  stop: str = "heuristic",
) -> Int[Array, "B T"]:
  """Best translation ids [B, T] of a padded source batch (beam search, or greedy for beam 1).

  T = min(S + max_extra_tokens, model.config.max_len); sentence b has at most its own source
  length + max_extra_tokens of them (`length_limits`).
  """
  max_new_tokens = min(src_ids_BS.shape[1] + max_extra_tokens, model.config.max_len)
  limits_B = length_limits(src_ids_BS, max_extra_tokens, max_new_tokens, model.config.pad_id)
  if beam_size == 1:
    return greedy_decode(
      model, src_ids_BS, max_new_tokens=max_new_tokens, max_new_tokens_B=limits_B
    )
  tokens_BKT, _ = beam_search(
    model,
    src_ids_BS,
    max_new_tokens=max_new_tokens,
    beam_size=beam_size,
    alpha=alpha,
    num_results=1,
    max_new_tokens_B=limits_B,
    stop=stop,
  )
  return tokens_BKT[:, 0]
