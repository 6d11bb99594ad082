"""The model: attention, layers, and the encoder-decoder, encoder-only and decoder-only families."""

from transformer.model.attention import (MultiHeadAttention, attention_logits, attention_weights,
                                         dot_product_attention)
from transformer.model.blockwise import blockwise_attention
from transformer.model.config import TransformerConfig
from transformer.model.layers import (Embedding, FeedForward, PositionEncoding, rotary_embedding,
                                      sinusoidal_position_encoding)
from transformer.model.masks import causal_mask, padding_mask
from transformer.model.transformer import (Decoder, DecoderLayer, DecoderOnly, Encoder,
                                           EncoderDecoder, EncoderLayer, EncoderOnly)
