"""The model: attention, layers, and the encoder-decoder, encoder-only and decoder-only families."""

from transformer.model.attention import (
  MultiHeadAttention,
  attention_logits,
  attention_weights,
  dot_product_attention,
)
from transformer.model.blockwise import blockwise_attention
from transformer.model.config import TransformerConfig
from transformer.model.layers import (
  Embedding,
  FeedForward,
  PositionEncoding,
  rotary_embedding,
  sinusoidal_position_encoding,
)
from transformer.model.masks import causal_mask, padding_mask, segment_mask
from transformer.model.transformer import (
  FAMILIES,
  Decoder,
  DecoderLayer,
  DecoderOnly,
  Encoder,
  EncoderDecoder,
  EncoderLayer,
  EncoderOnly,
  create_model,
)

__all__ = [
  "FAMILIES",
  "Decoder",
  "DecoderLayer",
  "DecoderOnly",
  "Embedding",
  "Encoder",
  "EncoderDecoder",
  "EncoderLayer",
  "EncoderOnly",
  "FeedForward",
  "MultiHeadAttention",
  "PositionEncoding",
  "TransformerConfig",
  "attention_logits",
  "attention_weights",
  "blockwise_attention",
  "causal_mask",
  "create_model",
  "dot_product_attention",
  "padding_mask",
  "rotary_embedding",
  "segment_mask",
  "sinusoidal_position_encoding",
]
