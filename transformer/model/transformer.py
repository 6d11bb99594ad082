"""Encoder and decoder stacks (Section 3.1) and the three model families built from them."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from transformer.model.attention import MultiHeadAttention
from transformer.model.masks import padding_mask
from transformer.model.config import TransformerConfig
from transformer.model.layers import (Embedding, FeedForward, LayerNorm, OutputProjection,
                                      PositionEncoding, param)
from transformer.parallel.axes import EMBED, VOCAB


class Residual(nnx.Module):
  """A sub-layer's residual connection and LayerNorm (Section 5.4 dropout included).

  post-LN (the paper): LayerNorm(x + Dropout(Sublayer(x)));
  pre-LN (option):     x + Dropout(Sublayer(LayerNorm(x))), easier to train deep without warm-up.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.pre_norm = config.norm == "pre"
    self.norm = LayerNorm(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, x_BTD, sublayer: Callable[[jax.Array], jax.Array]):
    if self.pre_norm:
      return x_BTD + self.dropout(sublayer(self.norm(x_BTD)))
    return self.norm(x_BTD + self.dropout(sublayer(x_BTD)))


class EncoderLayer(nnx.Module):
  """Self-attention, then the feed-forward network, each wrapped in `Residual`."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.self_attention = MultiHeadAttention(config, rngs=rngs)
    self.attention_block = Residual(config, rngs=rngs)
    self.feed_forward = FeedForward(config, rngs=rngs)
    self.feed_forward_block = Residual(config, rngs=rngs)

  def __call__(self, x_BSD, mask_B11S, positions_BS):
    attend = lambda y: self.self_attention(y, mask=mask_B11S, q_positions_BT=positions_BS)
    x_BSD = self.attention_block(x_BSD, attend)
    return self.feed_forward_block(x_BSD, self.feed_forward)


class DecoderLayer(nnx.Module):
  """Masked self-attention, encoder-decoder attention (if `cross`), then the feed-forward net."""

  def __init__(self, config: TransformerConfig, *, cross: bool, rngs: nnx.Rngs):
    self.self_attention = MultiHeadAttention(config, rngs=rngs)
    self.self_attention_block = Residual(config, rngs=rngs)
    if cross:
      self.cross_attention = MultiHeadAttention(config, cross=True, rngs=rngs)
      self.cross_attention_block = Residual(config, rngs=rngs)
    else:
      self.cross_attention = None
    self.feed_forward = FeedForward(config, rngs=rngs)
    self.feed_forward_block = Residual(config, rngs=rngs)

  def __call__(self, x_BTD, memory_BSD, self_mask, memory_mask_B11S, positions_BT, decode):
    # Outside decoding the causal part of the mask is built blockwise by the attention itself.
    attend_self = lambda y: self.self_attention(y, mask=self_mask, is_causal=not decode,
                                                q_positions_BT=positions_BT, decode=decode)
    x_BTD = self.self_attention_block(x_BTD, attend_self)
    if self.cross_attention is not None:
      attend_memory = lambda y: self.cross_attention(y, memory_BSD, mask=memory_mask_B11S,
                                                     decode=decode)
      x_BTD = self.cross_attention_block(x_BTD, attend_memory)
    return self.feed_forward_block(x_BTD, self.feed_forward)


class Encoder(nnx.Module):
  """Embedding + positions + dropout, then L encoder layers: source ids [B, S] -> memory [B, S, D]."""

  def __init__(self, config: TransformerConfig, embed: Embedding, *, rngs: nnx.Rngs):
    self.config, self.embed = config, embed
    self.positions = PositionEncoding(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(config, rngs=rngs)
                            for _ in range(config.num_encoder_layers)])
    # Pre-LN leaves the residual stream un-normalised: one last LayerNorm closes the stack.
    self.final_norm = LayerNorm(config, rngs=rngs) if config.norm == "pre" else None

  def __call__(self, ids_BS: Int[Array, "B S"]) -> Float[Array, "B S D"]:
    positions_BS = jnp.broadcast_to(jnp.arange(ids_BS.shape[1]), ids_BS.shape)
    x_BSD = self.dropout(self.positions(self.embed(ids_BS), positions_BS))
    mask_B11S = padding_mask(ids_BS, self.config.pad_id)
    for layer in self.layers:
      x_BSD = layer(x_BSD, mask_B11S, positions_BS)
    return x_BSD if self.final_norm is None else self.final_norm(x_BSD)


class Decoder(nnx.Module):
  """Embedding + positions + dropout, then L decoder layers: target ids [B, T] -> [B, T, D].

  With `cross=False` the layers have no encoder-decoder attention (the decoder-only family).
  """

  def __init__(self, config: TransformerConfig, embed: Embedding, *, cross: bool,
               rngs: nnx.Rngs):
    self.config, self.embed = config, embed
    self.positions = PositionEncoding(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, cross=cross, rngs=rngs)
                            for _ in range(config.num_decoder_layers)])
    self.final_norm = LayerNorm(config, rngs=rngs) if config.norm == "pre" else None
    self.cache_index = nnx.data(None)
    self.memory_mask = nnx.data(None)

  def init_cache(self, batch_size: int, max_length: int, memory_BSD=None,
                 memory_mask_B11S=None) -> None:
    """Prepares incremental decoding of up to `max_length` positions."""
    if max_length > self.config.max_len:
      raise ValueError(f"cannot decode {max_length} positions: model.max_len is "
                       f"{self.config.max_len}; raise it or decode fewer tokens")
    for layer in self.layers:
      layer.self_attention.init_cache(batch_size, max_length)
      if layer.cross_attention is not None:
        layer.cross_attention.init_cache(batch_size, max_length, memory_BSD)
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))
    self.memory_mask = None if memory_mask_B11S is None else nnx.Cache(memory_mask_B11S)

  def __call__(self, ids_BT: Int[Array, "B T"], memory_BSD=None, memory_mask_B11S=None, *,
               decode: bool = False) -> Float[Array, "B T D"]:
    offset = 0
    if decode:
      offset = self.cache_index[...]
      self.cache_index[...] = offset + ids_BT.shape[1]
      if self.memory_mask is not None:
        memory_mask_B11S = self.memory_mask[...]
    positions_BT = jnp.broadcast_to(offset + jnp.arange(ids_BT.shape[1]), ids_BT.shape)
    x_BTD = self.dropout(self.positions(self.embed(ids_BT), positions_BT))
    # Padding keys are hidden from every query; in decode mode the cache tracks what is visible.
    self_mask = None if decode else padding_mask(ids_BT, self.config.pad_id)
    for layer in self.layers:
      x_BTD = layer(x_BTD, memory_BSD, self_mask, memory_mask_B11S, positions_BT, decode)
    return x_BTD if self.final_norm is None else self.final_norm(x_BTD)


class EncoderDecoder(nnx.Module):
  """The paper's translation model: `encode` the source once, `decode` target positions.

  `__call__(src, tgt)` takes the decoder's input (targets shifted right, starting with BOS) and
  returns logits [B, T, V] in `config.logits_dtype`; softmax(logits[:, t]) is the distribution of
  token t + 1.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.source_embed = Embedding(config, rngs=rngs)
    self.target_embed = (self.source_embed if config.share_embeddings
                         else Embedding(config, rngs=rngs))
    self.encoder = Encoder(config, self.source_embed, rngs=rngs)
    self.decoder = Decoder(config, self.target_embed, cross=True, rngs=rngs)
    self.output = None if config.tie_output else OutputProjection(config, rngs=rngs)

  def encode(self, src_ids_BS: Int[Array, "B S"]) -> Float[Array, "B S D"]:
    """Source ids [B, S] -> memory [B, S, D]."""
    return self.encoder(src_ids_BS)

  def logits(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    return self.target_embed.attend(x_BTD) if self.output is None else self.output(x_BTD)

  def decode(self, tgt_ids_BT: Int[Array, "B T"], memory_BSD: Float[Array, "B S D"] | None,
             src_ids_BS: Int[Array, "B S"] | None, *, decode: bool = False) -> Float[Array, "B T V"]:
    """Decoder input ids [B, T] + memory [B, S, D] -> logits [B, T, V].

    With `decode=True` (after `init_cache`), `tgt_ids` holds only the new positions, and memory
    and source come from the cache (pass None).
    """
    memory_mask = None if src_ids_BS is None else padding_mask(src_ids_BS, self.config.pad_id)
    return self.logits(self.decoder(tgt_ids_BT, memory_BSD, memory_mask, decode=decode))

  def init_cache(self, memory_BSD: Float[Array, "B S D"], src_ids_BS: Int[Array, "B S"],
                 max_length: int) -> None:
    """Caches the projected memory and allocates self-attention caches for `max_length` steps."""
    self.decoder.init_cache(src_ids_BS.shape[0], max_length, memory_BSD,
                            padding_mask(src_ids_BS, self.config.pad_id))

  def __call__(self, src_ids_BS: Int[Array, "B S"], tgt_ids_BT: Int[Array, "B T"]):
    return self.decode(tgt_ids_BT, self.encode(src_ids_BS), src_ids_BS)


class DecoderOnly(nnx.Module):
  """GPT-style language model: ids [B, T] -> next-token logits [B, T, V]."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embedding(config, rngs=rngs)
    self.decoder = Decoder(config, self.embed, cross=False, rngs=rngs)
    self.output = None if config.tie_output else OutputProjection(config, rngs=rngs)

  def init_cache(self, batch_size: int, max_length: int) -> None:
    self.decoder.init_cache(batch_size, max_length)

  def __call__(self, ids_BT: Int[Array, "B T"], *, decode: bool = False) -> Float[Array, "B T V"]:
    x_BTD = self.decoder(ids_BT, decode=decode)
    return self.embed.attend(x_BTD) if self.output is None else self.output(x_BTD)


class MaskedLMHead(nnx.Module):
  """BERT's masked-LM head: dense + GELU + LayerNorm, then the tied embedding plus a bias."""

  def __init__(self, config: TransformerConfig, embed: Embedding, *, rngs: nnx.Rngs):
    self.config, self.embed = config, embed
    d = config.d_model
    self.dense = param(rngs, nnx.initializers.xavier_uniform(), (d, d), (EMBED, None),
                       config.weight_dtype)
    self.norm = LayerNorm(config, rngs=rngs)
    self.bias = param(rngs, nnx.initializers.zeros, (config.vocab_size,), (VOCAB,),
                      config.weight_dtype)

  def __call__(self, x_BSD: Float[Array, "B S D"]) -> Float[Array, "B S V"]:
    h_BSD = jnp.einsum("BSD,DE->BSE", x_BSD, self.dense[...].astype(x_BSD.dtype))
    logits_BSV = self.embed.attend(self.norm(jax.nn.gelu(h_BSD)))
    return logits_BSV + self.bias[...].astype(logits_BSV.dtype)[None, None]


class EncoderOnly(nnx.Module):
  """BERT-style encoder: ids [B, S] -> contextual embeddings [B, S, D], with two heads."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embedding(config, rngs=rngs)
    self.encoder = Encoder(config, self.embed, rngs=rngs)
    self.mlm_head = MaskedLMHead(config, self.embed, rngs=rngs)
    d = config.d_model
    w = config.weight_dtype
    self.pooler = param(rngs, nnx.initializers.xavier_uniform(), (d, d), (EMBED, None), w)
    self.classifier = param(rngs, nnx.initializers.xavier_uniform(), (d, config.num_classes),
                            (EMBED, None), w)
    self.classifier_bias = param(rngs, nnx.initializers.zeros, (config.num_classes,), (None,), w)

  def __call__(self, ids_BS: Int[Array, "B S"]) -> Float[Array, "B S D"]:
    return self.encoder(ids_BS)

  def mlm_logits(self, ids_BS: Int[Array, "B S"]) -> Float[Array, "B S V"]:
    """Logits of the original token at every position (the loss reads only masked ones)."""
    return self.mlm_head(self(ids_BS))

  def classify(self, ids_BS: Int[Array, "B S"]) -> Float[Array, "B C"]:
    """Sequence-classification logits [B, num_classes] from the first position's state."""
    first_BD = self(ids_BS)[:, 0]
    pooled_BD = jnp.tanh(first_BD @ self.pooler[...].astype(first_BD.dtype))
    logits_BC = pooled_BD @ self.classifier[...].astype(first_BD.dtype)
    return logits_BC.astype(jnp.float32) + self.classifier_bias[...].astype(jnp.float32)[None]

