"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) in JAX and Flax NNX.

Dimension key, used in every shape comment, tensor suffix and einsum string:
  B batch, S source length, T target length, D d_model, N heads, H head width (the paper's d_k),
  F d_ff, V vocabulary, L layers, K attention block, C classes, W beam width (R = B W rows).
"""

from transformer.model import (
  DecoderOnly,
  EncoderDecoder,
  EncoderOnly,
  MultiHeadAttention,
  TransformerConfig,
  dot_product_attention,
  sinusoidal_position_encoding,
)

__all__ = [
  "DecoderOnly",
  "EncoderDecoder",
  "EncoderOnly",
  "MultiHeadAttention",
  "TransformerConfig",
  "dot_product_attention",
  "sinusoidal_position_encoding",
]
__version__ = "0.1.0"
