"""A batch of sources to translate: the padded length it gets, and the search that decodes it."""

from __future__ import annotations

from jaxtyping import Array, Int

from transformer.decode.beam_search import beam_search
from transformer.decode.greedy import greedy_decode


def padded_length(length: int, max_len: int) -> int:
  """`length` rounded up to a multiple of 8 (few distinct shapes, few compilations), but never
  past `max_len`, the longest sequence the model has positions for."""
  return min(-(-length // 8) * 8, max(length, max_len))


def translate_ids(
  model, src_ids_BS: Int[Array, "B S"], *, beam_size: int, alpha: float, max_extra_tokens: int
) -> Int[Array, "B T"]:
  """Best translation ids [B, T] of a padded source batch (beam search, or greedy for beam 1).

  T = min(S + max_extra_tokens, model.config.max_len).
  """
  max_new_tokens = min(src_ids_BS.shape[1] + max_extra_tokens, model.config.max_len)
  if beam_size == 1:
    return greedy_decode(model, src_ids_BS, max_new_tokens=max_new_tokens)
  tokens_BWT, _ = beam_search(
    model, src_ids_BS, max_new_tokens=max_new_tokens, beam_size=beam_size, alpha=alpha
  )
  return tokens_BWT[:, 0]
