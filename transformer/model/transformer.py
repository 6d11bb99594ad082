"""Encoder and decoder stacks (Section 3.1) and the three model families built from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from transformer.errors import UserError
from transformer.model import init
from transformer.model.attention import MultiHeadAttention
from transformer.model.config import TransformerConfig
from transformer.model.layers import (
  Embedding,
  FeedForward,
  LayerNorm,
  OutputProjection,
  PositionEncoding,
  param,
)
from transformer.model.masks import padding_mask, segment_mask
from transformer.model.stacking import scan_stack, stack_modules, unstack_module
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
      self.cross_attention: MultiHeadAttention | None = MultiHeadAttention(
        config, cross=True, rngs=rngs
      )
      self.cross_attention_block = Residual(config, rngs=rngs)
    else:
      self.cross_attention = None
    self.feed_forward = FeedForward(config, rngs=rngs)
    self.feed_forward_block = Residual(config, rngs=rngs)

  def __call__(self, x_BTD, memory_BSD, self_mask, memory_mask, positions_BT, use_cache):
    # Outside decoding the causal part of the mask is built blockwise by the attention itself.
    attend_self = lambda y: self.self_attention(
      y, mask=self_mask, is_causal=not use_cache, q_positions_BT=positions_BT, use_cache=use_cache
    )
    x_BTD = self.self_attention_block(x_BTD, attend_self)
    if self.cross_attention is not None:
      attend_memory = lambda y: self.cross_attention(
        y, memory_BSD, mask=memory_mask, use_cache=use_cache
      )
      x_BTD = self.cross_attention_block(x_BTD, attend_memory)
    return self.feed_forward_block(x_BTD, self.feed_forward)


def layer_stack(config: TransformerConfig, layers: list[nnx.Module]) -> Any:
  """The layers as an `nnx.List`, or as one stacked module for `nnx.scan` with
  `config.scan_layers` (see `transformer.model.stacking`)."""
  return stack_modules(layers) if config.scan_layers and layers else nnx.List(layers)


def is_stacked(layers: nnx.Module) -> bool:
  return not isinstance(layers, nnx.List)


class Encoder(nnx.Module):
  """Embedding + positions + dropout, then L encoder layers: source ids [B, S] -> memory [B, S, D].

  Packed rows (several sentences in one row) pass `segments_BS` (1, 2, ... per sentence, 0 for
  padding) and `positions_BS` (counting from 0 in each sentence): a token then attends only to
  its own sentence.
  """

  def __init__(self, config: TransformerConfig, embed: Embedding, *, rngs: nnx.Rngs):
    self.config, self.embed = config, embed
    self.positions = PositionEncoding(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.layers = layer_stack(
      config, [EncoderLayer(config, rngs=rngs) for _ in range(config.num_encoder_layers)]
    )
    # Pre-LN leaves the residual stream un-normalised: one last LayerNorm closes the stack.
    self.final_norm = LayerNorm(config, rngs=rngs) if config.norm == "pre" else None

  def _stack_input(self, ids_BS, segments_BS, positions_BS):
    """(sqrt(D) * embedding + positions after dropout, the attention mask, the positions)."""
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(ids_BS.shape[1]), ids_BS.shape)
    mask = (
      padding_mask(ids_BS, self.config.pad_id)
      if segments_BS is None
      else segment_mask(segments_BS, segments_BS)
    )
    return self.dropout(self.positions(self.embed(ids_BS), positions_BS)), mask, positions_BS

  def residual_stream(
    self,
    ids_BS: Int[Array, "B S"],
    segments_BS: Int[Array, "B S"] | None = None,
    positions_BS: Int[Array, "B S"] | None = None,
  ) -> list[Float[Array, "B S D"]]:
    """The stack's input (sqrt(D) * embedding + positions, after dropout) and the output of
    each of its L layers, the last one after the final LayerNorm of a pre-LN stack."""
    x_BSD, mask, positions_BS = self._stack_input(ids_BS, segments_BS, positions_BS)
    states = [x_BSD]
    if is_stacked(self.layers):
      apply = lambda layer, x: layer(x, mask, positions_BS)
      _, outputs_LBSD = scan_stack(self.layers, x_BSD, apply, all_outputs=True)
      states += list(outputs_LBSD)
    else:
      for layer in self.layers:
        states.append(layer(states[-1], mask, positions_BS))
    if self.final_norm is not None:
      states[-1] = self.final_norm(states[-1])
    return states

  def __call__(
    self,
    ids_BS: Int[Array, "B S"],
    segments_BS: Int[Array, "B S"] | None = None,
    positions_BS: Int[Array, "B S"] | None = None,
  ) -> Float[Array, "B S D"]:
    if not is_stacked(self.layers):
      return self.residual_stream(ids_BS, segments_BS, positions_BS)[-1]
    # The scan alone, without the [L, B, S, D] of every layer's output that residual_stream keeps.
    x_BSD, mask, positions_BS = self._stack_input(ids_BS, segments_BS, positions_BS)
    x_BSD = scan_stack(self.layers, x_BSD, lambda layer, x: layer(x, mask, positions_BS))
    return x_BSD if self.final_norm is None else self.final_norm(x_BSD)


class Decoder(nnx.Module):
  """Embedding + positions + dropout, then L decoder layers: target ids [B, T] -> [B, T, D].

  With `cross=False` the layers have no encoder-decoder attention (the decoder-only family).
  Packed rows pass segments and positions as `Encoder` does.
  """

  def __init__(self, config: TransformerConfig, embed: Embedding, *, cross: bool, rngs: nnx.Rngs):
    self.config, self.embed = config, embed
    self.positions = PositionEncoding(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.layers = layer_stack(
      config,
      [DecoderLayer(config, cross=cross, rngs=rngs) for _ in range(config.num_decoder_layers)],
    )
    self.final_norm = LayerNorm(config, rngs=rngs) if config.norm == "pre" else None
    self.cache_index: Any = nnx.data(None)
    self.memory_mask: Any = nnx.data(None)
    # Stacked layers decode through per-layer copies made by init_cache (see there).
    self.cache_layers: Any = nnx.data(None)

  def init_cache(
    self,
    batch_size: int,
    cache_length: int,
    memory_BSD=None,
    memory_mask_B11S=None,
    *,
    beams: int = 1,
    groups: int = 1,
  ) -> None:
    """Prepares incremental decoding of up to `cache_length` positions.

    `beams` > 1 lets W hypotheses of one sentence share a cache row (beam search): each call
    then feeds T = W queries, one per beam, all at the same position, and the self-attention
    cache holds W slots per position (slot t * W + w: beam w's keys at position t). Which slots
    a beam reads is the caller's `cache_mask`. `groups`: rows that advance apart, in equal groups
    (see `attend_filled_prefix`).
    """
    if cache_length > self.config.max_len:
      raise UserError(
        f"cannot decode {cache_length} positions: model.max_len is "
        f"{self.config.max_len}; raise it or decode fewer tokens"
      )
    layers = self.layers
    if is_stacked(self.layers):
      # Decoding runs the layers one by one, each with its own cache whose rows come first, from
      # copies of the stacked parameters: decoding reads them only, and the copies live as long
      # as the decoding state.
      self.cache_layers = nnx.List(unstack_module(self.layers))
      layers = self.cache_layers
    # Attend over the filled part of the cache, in steps of 16 positions (at most 8 prefix lengths
    # are compiled). A short cache of one hypothesis per row is read whole: there the branches
    # cost more than the slots they skip (greedy over test_2016, 114 slots: 5.6 against 6.35 CPU s).
    short = beams == 1 and cache_length <= 128
    block = None if short else beams * max(16, -(-cache_length // 8))
    for layer in layers:
      layer.self_attention.init_cache(
        batch_size, cache_length * beams, beams=beams, block=block, groups=groups
      )
      if layer.cross_attention is not None:
        layer.cross_attention.init_cache(batch_size, cache_length, memory_BSD)
    if self.config.tie_output:  # the output layer's table in the layout a step reads
      self.embed.init_cache()
    self.cache_index = nnx.Cache(jnp.zeros((batch_size,), jnp.int32))  # next position, per row
    self.memory_mask = None if memory_mask_B11S is None else nnx.Cache(memory_mask_B11S)

  def __call__(
    self,
    ids_BT: Int[Array, "B T"],
    memory_BSD=None,
    memory_mask=None,
    *,
    segments_BT: Int[Array, "B T"] | None = None,
    positions_BT: Int[Array, "B T"] | None = None,
    use_cache: bool = False,
    cache_mask: Bool[Array, "B 1 T C"] | None = None,
  ) -> Float[Array, "B T D"]:
    """`memory_mask`: which memory positions each query sees, [B, 1, 1, S] or [B, 1, T, S].
    `use_cache` (after `init_cache`): `ids_BT` holds only the new positions (at `positions_BT`,
    by default where each row stopped); `cache_mask`
    [B, 1, T, C] (C cache slots), if given, hides slots from queries on top of the causal rule
    (beam search: the slots of other hypotheses)."""
    offset_B1 = jnp.zeros((1, 1), jnp.int32)
    if use_cache:
      offset_B1 = self.cache_index[...][:, None]
      self.cache_index[...] = self.cache_index[...] + ids_BT.shape[1]
      if self.memory_mask is not None:
        memory_mask = self.memory_mask[...]
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(offset_B1 + jnp.arange(ids_BT.shape[1])[None], ids_BT.shape)
    x_BTD = self.dropout(self.positions(self.embed(ids_BT), positions_BT))
    # Padding keys are hidden from every query; with the cache it tracks what is visible.
    if use_cache:
      self_mask = cache_mask
    elif segments_BT is None:
      self_mask = padding_mask(ids_BT, self.config.pad_id)
    else:
      self_mask = segment_mask(segments_BT, segments_BT)
    if is_stacked(self.layers) and not use_cache:
      apply = lambda layer, x: layer(x, memory_BSD, self_mask, memory_mask, positions_BT, False)
      x_BTD = scan_stack(self.layers, x_BTD, apply)
    else:
      for layer in self.cache_layers if is_stacked(self.layers) else self.layers:
        x_BTD = layer(x_BTD, memory_BSD, self_mask, memory_mask, positions_BT, use_cache)
    return x_BTD if self.final_norm is None else self.final_norm(x_BTD)


class EncoderDecoder(nnx.Module):
  """The paper's translation model: `encode` the source once, `decode` target positions.

  `__call__(src, tgt)` takes the decoder's input (targets shifted right, starting with BOS) and
  returns logits [B, T, V] in `config.resolved_logits_dtype`; softmax(logits[:, t]) is the
  distribution of token t + 1. Packed rows also pass the segments and positions of both sides:
  target sentence i of a row then reads only source sentence i of that row.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.source_embed = Embedding(config, rngs=rngs)
    self.target_embed = (
      self.source_embed if config.share_embeddings else Embedding(config, rngs=rngs)
    )
    self.encoder = Encoder(config, self.source_embed, rngs=rngs)
    self.decoder = Decoder(config, self.target_embed, cross=True, rngs=rngs)
    self.output = None if config.tie_output else OutputProjection(config, rngs=rngs)

  def encode(
    self,
    src_ids_BS: Int[Array, "B S"],
    src_segments_BS: Int[Array, "B S"] | None = None,
    src_positions_BS: Int[Array, "B S"] | None = None,
  ) -> Float[Array, "B S D"]:
    """Source ids [B, S] -> memory [B, S, D]."""
    return self.encoder(src_ids_BS, src_segments_BS, src_positions_BS)

  def logits(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    return self.target_embed.attend(x_BTD) if self.output is None else self.output(x_BTD)

  def decode(
    self,
    tgt_ids_BT: Int[Array, "B T"],
    memory_BSD: Float[Array, "B S D"] | None = None,
    src_ids_BS: Int[Array, "B S"] | None = None,
    *,
    src_segments_BS: Int[Array, "B S"] | None = None,
    tgt_segments_BT: Int[Array, "B T"] | None = None,
    tgt_positions_BT: Int[Array, "B T"] | None = None,
    use_cache: bool = False,
    cache_mask: Bool[Array, "B 1 T C"] | None = None,
  ) -> Float[Array, "B T V"]:
    """Decoder input ids [B, T] + memory [B, S, D] -> logits [B, T, V].

    With `use_cache=True` (after `init_cache`), `tgt_ids` holds only the new positions, and
    memory and source come from the cache (leave them None); `cache_mask` see `Decoder`.
    """
    if src_ids_BS is None:
      memory_mask = None
    elif tgt_segments_BT is None or src_segments_BS is None:
      memory_mask = padding_mask(src_ids_BS, self.config.pad_id)
    else:
      memory_mask = segment_mask(tgt_segments_BT, src_segments_BS)
    x_BTD = self.decoder(
      tgt_ids_BT,
      memory_BSD,
      memory_mask,
      segments_BT=tgt_segments_BT,
      positions_BT=tgt_positions_BT,
      use_cache=use_cache,
      cache_mask=cache_mask,
    )
    return self.logits(x_BTD)

  def init_cache(
    self,
    memory_BSD: Float[Array, "B S D"],
    src_ids_BS: Int[Array, "B S"],
    cache_length: int,
    *,
    beams: int = 1,
    groups: int = 1,
  ) -> None:
    """Caches the projected memory and allocates self-attention caches for `cache_length` steps
    (of `beams` hypotheses per source row, `groups` of rows, see `Decoder.init_cache`)."""
    self.decoder.init_cache(
      src_ids_BS.shape[0],
      cache_length,
      memory_BSD,
      padding_mask(src_ids_BS, self.config.pad_id),
      beams=beams,
      groups=groups,
    )

  def __call__(
    self,
    src_ids_BS: Int[Array, "B S"],
    tgt_ids_BT: Int[Array, "B T"],
    *,
    src_segments_BS: Int[Array, "B S"] | None = None,
    tgt_segments_BT: Int[Array, "B T"] | None = None,
    src_positions_BS: Int[Array, "B S"] | None = None,
    tgt_positions_BT: Int[Array, "B T"] | None = None,
  ) -> Float[Array, "B T V"]:
    memory_BSD = self.encode(src_ids_BS, src_segments_BS, src_positions_BS)
    return self.decode(
      tgt_ids_BT,
      memory_BSD,
      src_ids_BS,
      src_segments_BS=src_segments_BS,
      tgt_segments_BT=tgt_segments_BT,
      tgt_positions_BT=tgt_positions_BT,
    )


class DecoderOnly(nnx.Module):
  """GPT-style language model: ids [B, T] -> next-token logits [B, T, V]."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embedding(config, rngs=rngs)
    self.decoder = Decoder(config, self.embed, cross=False, rngs=rngs)
    self.output = None if config.tie_output else OutputProjection(config, rngs=rngs)

  def init_cache(self, batch_size: int, cache_length: int) -> None:
    self.decoder.init_cache(batch_size, cache_length)

  def __call__(
    self, ids_BT: Int[Array, "B T"], *, use_cache: bool = False
  ) -> Float[Array, "B T V"]:
    x_BTD = self.decoder(ids_BT, use_cache=use_cache)
    return self.embed.attend(x_BTD) if self.output is None else self.output(x_BTD)


class MaskedLMHead(nnx.Module):
  """BERT's masked-LM head: dense + GELU + LayerNorm, then the tied embedding plus a bias."""

  def __init__(self, config: TransformerConfig, embed: Embedding, *, rngs: nnx.Rngs):
    self.config, self.embed = config, embed
    d = config.d_model
    self.dense = param(
      rngs, init.xavier_uniform(), (d, d), (EMBED, None), jnp.dtype(config.param_dtype)
    )
    self.norm = LayerNorm(config, rngs=rngs)
    self.bias = param(
      rngs, init.zeros, (config.vocab_size,), (VOCAB,), jnp.dtype(config.param_dtype)
    )

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
    w = jnp.dtype(config.param_dtype)
    self.pooler = param(rngs, init.xavier_uniform(), (d, d), (EMBED, None), w)
    self.classifier = param(rngs, init.xavier_uniform(), (d, config.num_classes), (EMBED, None), w)
    self.classifier_bias = param(rngs, init.zeros, (config.num_classes,), (None,), w)

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


FAMILIES = {"translation": EncoderDecoder, "lm": DecoderOnly, "mlm": EncoderOnly}


def create_model(task: str, config: TransformerConfig, seed: int) -> nnx.Module:
  """A freshly initialised model of the task's family (`FAMILIES`), its dropout RNG stream
  seeded apart from its parameters."""
  return FAMILIES[task](config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
