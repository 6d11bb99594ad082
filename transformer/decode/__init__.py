"""Decoding: greedy search, beam search and sampling, each a jitted `while_loop` over the KV cache.

Dimension key (as in the package docstring) plus, in this package, W beams per sentence (the
beam width) and R = B * W model rows during beam search: B batch, S source length, T target
length, D d_model, N heads, H head width, V vocabulary.

Every entry point takes the model itself, runs on a copy of it in eval mode, and is compiled once
per (model graph, static arguments, input shapes); see `jit_with_model`.
"""

from transformer.decode.batch import padded_length, translate_ids
from transformer.decode.beam_search import beam_search, length_penalty
from transformer.decode.cache import call_cached, gather_beams, jit_with_model, split_cache
from transformer.decode.greedy import greedy_decode
from transformer.decode.sampling import choose_token, keep_top_k, keep_top_p, sample

__all__ = [
  "beam_search",
  "call_cached",
  "choose_token",
  "gather_beams",
  "greedy_decode",
  "jit_with_model",
  "keep_top_k",
  "keep_top_p",
  "length_penalty",
  "padded_length",
  "sample",
  "split_cache",
  "translate_ids",
]
