"""The model: attention, layers, and the encoder-decoder, encoder-only and decoder-only families."""

from transformer.model.attention import (MultiHeadAttention, attention_logits, attention_weights,
                                         blockwise_attention, causal_mask, dot_product_attention,
                                         padding_mask)
from transformer.model.config import TransformerConfig
from transformer.model.layers import (Embedding, FeedForward, PositionEncoding, rotary_embedding,
                                      sinusoidal_position_encoding)
from transformer.model.transformer import (Decoder, DecoderLayer, DecoderOnly, Encoder,
                                           EncoderDecoder, EncoderLayer, EncoderOnly)
