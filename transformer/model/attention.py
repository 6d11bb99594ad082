"""Scaled dot-product attention (Section 3.2.1) in three implementations behind one function.

  Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Our H is the paper's d_k = d_v. Masks are boolean, True where a query may attend to a key, and
broadcast to [B, N, T, S]. A query that may attend to nothing (a fully masked row) gets a zero
output and zero weights in every implementation, never NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from transformer.model import init
from transformer.model.blockwise import blockwise_attention
from transformer.model.config import ATTENTION_IMPLEMENTATIONS, TransformerConfig
from transformer.model.layers import dense_BTK_KN, param, rotary_embedding
from transformer.model.masks import MASKED, as_4d, causal_mask
from transformer.parallel.axes import ACT_EMBED, BATCH, EMBED, HEADS, KV, LENGTH, constrain


def attention_logits(
  q_BTNH: Float[Array, "B T N H"], k_BSNH: Float[Array, "B S N H"]
) -> Float[Array, "B N T S"]:
  """The scaled dot products Q K^T / sqrt(d_k), in float32.

  The scale keeps the logits' variance at 1 for unit-variance q and k; without it large d_k
  pushes softmax into regions of vanishing gradient (Section 3.2.1, footnote 4).
  """
  scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
  return jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.named_call, name="attention")  # a name for profiles
def attention_weights(
  q_BTNH: Float[Array, "B T N H"],
  k_BSNH: Float[Array, "B S N H"],
  *,
  mask: Bool[Array, ...] | None = None,
  is_causal: bool = False,
) -> Float[Array, "B N T S"]:
  """softmax(Q K^T / sqrt(d_k)) in float32, masked entries exactly zero."""
  logits_BNTS = attention_logits(q_BTNH, k_BSNH)
  mask = _combine(as_4d(mask), is_causal, q_BTNH.shape[1], k_BSNH.shape[1])
  return masked_softmax(logits_BNTS, mask)


def masked_softmax(logits_BNTS: Float[Array, "B N T S"], mask) -> Float[Array, "B N T S"]:
  """softmax over the keys a query may see (mask None: all), masked entries exactly zero."""
  if mask is None:
    return jax.nn.softmax(logits_BNTS, axis=-1)
  weights_BNTS = jax.nn.softmax(jnp.where(mask, logits_BNTS, MASKED), axis=-1)
  # A fully masked row would otherwise spread uniformly over keys it may not see.
  return jnp.where(mask, weights_BNTS, 0.0)


def _combine(mask, is_causal: bool, q_len: int, kv_len: int):
  if not is_causal:
    return mask
  causal = causal_mask(q_len, kv_len)
  return causal if mask is None else mask & causal


def _xla_attention(q_BTNH, k_BSNH, v_BSNH, mask, is_causal):
  weights_BNTS = attention_weights(q_BTNH, k_BSNH, mask=mask, is_causal=is_causal)
  return jnp.einsum("BNTS,BSNH->BTNH", weights_BNTS.astype(v_BSNH.dtype), v_BSNH)


def _cudnn_attention(q_BTNH, k_BSNH, v_BSNH, mask, is_causal, implementation="cudnn"):
  """jax.nn.dot_product_attention: cuDNN's fused flash attention on NVIDIA GPUs."""
  if mask is not None and mask.shape[2] != q_BTNH.shape[1]:
    # cuDNN takes the mask as an additive bias with full query and key lengths ([b, n, T, S];
    # b and n may stay 1); a key-padding mask [B, 1, 1, S] is spread over the queries.
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_BTNH.shape[1], mask.shape[3]))
  out_BTNH = jax.nn.dot_product_attention(
    q_BTNH, k_BSNH, v_BSNH, mask=mask, is_causal=is_causal, implementation=implementation
  )
  mask = _combine(mask, is_causal, q_BTNH.shape[1], k_BSNH.shape[1])
  if mask is None:
    return out_BTNH
  # jax.nn averages all values on a fully masked row; we define that row's output as zero.
  any_key_BNT = jnp.broadcast_to(
    jnp.any(mask, axis=-1), (q_BTNH.shape[0], q_BTNH.shape[2], q_BTNH.shape[1])
  )
  return out_BTNH * jnp.transpose(any_key_BNT, (0, 2, 1))[..., None].astype(out_BTNH.dtype)


def resolve_implementation(
  implementation: str, dtype, head_dim: int, kv_len: int, q_len: int
) -> str:
  """The implementation that "auto" stands for on this backend and these shapes."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {implementation!r} is unknown: "
      f"use one of {ATTENTION_IMPLEMENTATIONS}"
    )
  if implementation != "auto":
    return implementation
  # cuDNN's fused kernel needs 16-bit inputs and H a multiple of 8 up to 128; with a mask (passed
  # as a bias) its backward pass also needs even lengths, so odd buckets take the XLA path.
  if (
    jax.default_backend() == "gpu"
    and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    and head_dim % 8 == 0
    and head_dim <= 128
    and q_len % 2 == 0
    and kv_len % 2 == 0
  ):
    return "cudnn"
  # Past ~1k x 1k the [T, S] score matrix costs more memory traffic than the blockwise loop.
  return "blockwise" if q_len * kv_len > 1024 * 1024 else "xla"


@functools.partial(jax.named_call, name="attention")  # a name for profiles
def dot_product_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S N H"],
  v: Float[Array, "B S N H"],
  *,
  mask: Bool[Array, ...] | None = None,
  is_causal: bool = False,
  implementation: str = "xla",
  block_size: int = 256,
) -> Float[Array, "B T N H"]:
  """softmax(Q K^T / sqrt(d_k)) V for every head at once.

  Args:
    q: queries [B, T, N, H]; k, v: keys and values [B, S, N, H].
    mask: bool, broadcastable to [B, N, T, S]; True = the query may attend to the key.
    is_causal: also forbid keys after the query's position (s > t), without building a mask.
    implementation: "xla" (einsum + softmax), "cudnn" (`jax.nn.dot_product_attention`, flash
      attention on NVIDIA GPUs), "blockwise" (online softmax, O(T x block) memory, any device),
      or "auto" (cudnn on a GPU in 16-bit, blockwise for long sequences, else xla).
    block_size: key block of the blockwise implementation.

  Returns:
    [B, T, N, H], in q's dtype; rows with no visible key are zero.
  """
  implementation = resolve_implementation(
    implementation, q.dtype, q.shape[-1], k.shape[1], q.shape[1]
  )
  mask = as_4d(mask)
  if implementation == "xla":
    return _xla_attention(q, k, v, mask, is_causal)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v, mask, is_causal)
  return blockwise_attention(q, k, v, mask, is_causal, block_size)


def cached_attention(
  q_BTNH: Float[Array, "B T N H"],
  k_BNCH: Float[Array, "B N C H"],
  v_BNCH: Float[Array, "B N C H"],
  mask: Bool[Array, ...] | None,
) -> Float[Array, "B T N H"]:
  """softmax(QK^T/sqrt(d_k))V over a decoding cache, stored heads first: with the heads beside
  the rows the two products are batched matmuls as they lie, where a [B, C, N, H] cache would
  be transposed whole at every step (memory traffic in proportion to the cache, per layer)."""
  scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
  logits_BNTC = jnp.einsum("BTNH,BNCH->BNTC", q_BTNH, k_BNCH, preferred_element_type=jnp.float32)
  weights_BNTC = masked_softmax(logits_BNTC * scale, as_4d(mask))
  # Products as plain batched matmuls ([T, C] x [C, H] per row and head): XLA:CPU runs a
  # product with another output order as a slow generic dot.
  out_BNTH = jnp.einsum("BNTC,BNCH->BNTH", weights_BNTC.astype(v_BNCH.dtype), v_BNCH)
  return jnp.swapaxes(out_BNTH, 1, 2)


def attend_filled_prefix(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B N C H"],
  v: Float[Array, "B N C H"],
  mask: Bool[Array, "B n T C"],
  filled_G: Int[Array, " G"],
  block: int,
) -> Float[Array, "B T N H"]:
  """Attention over the filled cache slots only, the rest being masked anyway.

  Reading all C slots at every decoding step costs memory traffic in proportion to C; early in
  a sentence few are filled. The prefix lengths block, 2 block, ..., C are each compiled once
  (`lax.switch`), and each step takes the shortest that holds the filled slots. The rows form G
  equal groups (consecutive rows) with `filled_G[g]` slots filled in group g, each taking its
  own prefix: rows that started decoding at different times need not read the longest's.
  """
  slots, groups = k.shape[2], filled_G.shape[0]
  lengths = [*range(block, slots, block), slots]
  rows = q.shape[0] // groups
  mask = jnp.broadcast_to(mask, (q.shape[0], *mask.shape[1:]))

  # Each branch slices its group's rows and prefix at once from the whole cache (a branch's
  # operands are not copied; slicing the rows first would copy the group's whole cache).
  def prefix(group: int, length: int):
    row = slice(group * rows, (group + 1) * rows)
    return lambda q, k, v, mask: cached_attention(
      q[row], k[row, :, :length], v[row, :, :length], mask[row, ..., :length]
    )

  index_G = jnp.clip((filled_G - 1) // block, 0, len(lengths) - 1)
  outs = [
    jax.lax.switch(index_G[g], [prefix(g, length) for length in lengths], q, k, v, mask)
    for g in range(groups)
  ]
  return outs[0] if groups == 1 else jnp.concatenate(outs, axis=0)


# Glorot over fan_in = D and fan_out = N * H, as for the paper's d_model x d_k matrices.
_INIT_IN = init.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
_INIT_OUT = init.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)


def project(x_BTD, kernel_DNH, bias_NH, dtype) -> Float[Array, "B T N H"]:
  """x W + b for every head at once (x W where `bias_NH` is None): one [D, N H] matmul whose
  weight gradient XLA:CPU runs fast (`dense_BTK_KN`)."""
  return project_together(x_BTD, [kernel_DNH], None if bias_NH is None else [bias_NH], dtype)[0]


def project_together(x_BTD, kernels_DNH, biases_NH, dtype) -> list[Float[Array, "B T N H"]]:
  """Several projections of one input (self-attention's Q, K and V) as one matmul; `biases_NH`
  None for projections without biases.

  Three [768, 128] x [128, 128] products and their gradients run as one of width 384 at a
  higher rate on the CPU (1.1-2.2 ms less of a ~46 ms step of the shakespeare_char model on one
  core, paired in one process). The
  weights are stacked heads first, [D, N, P, H], so the [D, N P H] view keeps heads the major
  axis and a split of the heads over devices (tensor parallelism) needs no resharding.
  """
  count = len(kernels_DNH)
  d, n, h = kernels_DNH[0].shape
  kernel_DNPH = jnp.stack([k.astype(dtype) for k in kernels_DNH], axis=2)
  y_BTK = dense_BTK_KN(x_BTD.astype(dtype), kernel_DNPH.reshape(d, n * count * h))
  y_BTNPH = y_BTK.reshape(*y_BTK.shape[:2], n, count, h)
  if biases_NH is not None:
    y_BTNPH = y_BTNPH + jnp.stack([b.astype(dtype) for b in biases_NH], axis=1)[None, None]
  # lax.split, not indexing: its gradient is one concatenation of the parts' gradients, where
  # each index's is a padded copy of the whole [B, T, N, P, H] and the copies are summed (1.3-1.7
  # ms of a ~50 ms shakespeare_char step on one core, paired in one process).
  parts = jax.lax.split(y_BTNPH, (1,) * count, axis=3)
  return [constrain(part.squeeze(3), (BATCH, LENGTH, HEADS, KV)) for part in parts]


def merge_heads(out_BTNH, out_NHD, out_bias_D, dtype) -> Float[Array, "B T D"]:
  """Concat(head_1..head_h) W^O + b as one [N H, D] matmul (no + b where `out_bias_D` is None)."""
  out_NHD = out_NHD.astype(dtype)
  n, h, d = out_NHD.shape
  out_BTK = out_BTNH.astype(dtype).reshape(*out_BTNH.shape[:2], n * h)  # K = N H
  y_BTD = dense_BTK_KN(out_BTK, out_NHD.reshape(n * h, d))
  if out_bias_D is not None:
    y_BTD = y_BTD + out_bias_D.astype(dtype)[None, None]
  return constrain(y_BTD, (BATCH, LENGTH, ACT_EMBED))


def _value(variable: nnx.Param | None) -> jax.Array | None:
  return None if variable is None else variable[...]


def heads_first(x_BSNH: Float[Array, "B S N H"]) -> Float[Array, "B N S H"]:
  """Keys or values in a decoding cache's layout (see `cached_attention`)."""
  return jnp.swapaxes(x_BSNH, 1, 2)


# Row b of a [B, N, C, H] cache gets its new entries [B, N, T, H] from slot start_B[b] on.
write_rows = jax.vmap(
  lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(cache, new, start, 1)
)


def cache_view(start_B, cache_length: int, new: int, groups: int):
  """(visible [B, 1, new, cache_length]: which slots each new entry attends to, filled [G]: the
  slots filled in each group of rows) for rows writing `new` entries from slot start_B."""
  slots_C = jnp.arange(cache_length)
  last_BT = start_B[:, None] + jnp.arange(new)[None, :]
  visible_B1TC = (slots_C[None, None, :] <= last_BT[:, :, None])[:, None]
  filled_G = jnp.max(start_B.reshape(groups, -1), axis=1) + new
  return visible_B1TC, filled_G


def attend(q_BTNH, k, v, mask, is_causal, cached: bool, filled, block, config: TransformerConfig):
  """softmax(QK^T/sqrt(d_k))V without forming the weights: over a decoding cache (k and v
  [B, N, C, H], over its filled prefix with `block`), else [B, S, N, H] through
  `dot_product_attention`'s implementation."""
  if cached:
    if filled is not None and block is not None:
      return attend_filled_prefix(q_BTNH, k, v, mask, filled, block)
    return cached_attention(q_BTNH, k, v, mask)
  return dot_product_attention(
    q_BTNH,
    k,
    v,
    mask=mask,
    is_causal=is_causal,
    implementation=config.attention,
    block_size=config.attention_block_size,
  )


class MultiHeadAttention(nnx.Module):
  """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

  The per-head projections are stored as one [D, N, H] tensor each (all heads in one einsum);
  the concatenation of heads followed by W^O is the [N, H, D] contraction in `out`.

  Decoding: after `init_cache`, calls with `use_cache=True` take the new positions only. Self-
  attention appends their keys and values to the cache; cross-attention reads the projected
  encoder output stored once by `init_cache(context=...)`.

  Inspection: with `sow_weights` set, each call also sows its weights [B, N, T, S] as
  `nnx.Intermediate` "attention_weights", so a caller can gather every layer's weights with
  `nnx.capture` without threading `return_weights` through the stacks (see
  `transformer.inspect`).
  """

  # A plain (static) attribute: off, the fused attention path below runs unchanged.
  sow_weights: bool = False

  def __init__(self, config: TransformerConfig, *, cross: bool = False, rngs: nnx.Rngs):
    self.config, self.cross = config, cross
    d, n, h, w = config.d_model, config.num_heads, config.head_dim, jnp.dtype(config.param_dtype)
    self.query = param(rngs, _INIT_IN, (d, n, h), (EMBED, HEADS, KV), w)
    self.key = param(rngs, _INIT_IN, (d, n, h), (EMBED, HEADS, KV), w)
    self.value = param(rngs, _INIT_IN, (d, n, h), (EMBED, HEADS, KV), w)
    self.out = param(rngs, _INIT_OUT, (n, h, d), (HEADS, KV, EMBED), w)
    bias = lambda shape, axes: param(rngs, init.zeros, shape, axes, w) if config.use_bias else None
    self.query_bias = bias((n, h), (HEADS, KV))
    self.key_bias = bias((n, h), (HEADS, KV))
    self.value_bias = bias((n, h), (HEADS, KV))
    self.out_bias = bias((d,), (EMBED,))
    self.weights_dropout = nnx.Dropout(config.attention_dropout_rate, rngs=rngs)
    # Filled by init_cache; declared as data so the cache is part of the module's state.
    self.cached_key: Any = nnx.data(None)
    self.cached_value: Any = nnx.data(None)
    # Static: hypotheses per position in the cache, groups of rows, and the slots per prefix
    # length that decoding attends over (`attend_filled_prefix`).
    self.cache_beams, self.cache_groups = 1, 1
    self.cache_block: int | None = None
    # Rotary positions belong to self-attention: source and target positions are not comparable.
    self.uses_rope = config.position == "rope" and not cross

  def _project(self, x_BTD, kernel: nnx.Param, bias: nnx.Param | None) -> Float[Array, "B T N H"]:
    return project(x_BTD, kernel[...], _value(bias), jnp.dtype(self.config.dtype))

  def init_cache(
    self,
    batch_size: int,
    cache_length: int,
    context_BSD: Float[Array, "B S D"] | None = None,
    *,
    beams: int = 1,
    block: int | None = None,
    groups: int = 1,
  ) -> None:
    """Allocates the KV cache: empty [B, N, cache_length, H] for self-attention, or the projected
    `context` (the encoder output) [B, N, S, H] for cross-attention (heads first: see
    `cached_attention`).

    Self-attention writes the keys of new entry j of row b at slot p * beams + j, p being the
    row's first new position (`q_positions_BT[b, 0]`): consecutive positions with beams = 1, or
    W hypotheses of one position side by side with beams = W (beam search). Rows may be at
    different positions, and a row sent back to position 0 starts afresh (what it wrote later is
    hidden by the causal rule). With `block`, each step attends over the filled slots rounded up
    to a multiple of `block` instead of all of them, in each of `groups` groups of rows apart
    (`attend_filled_prefix`).
    """
    if self.cross:
      self.cached_key = nnx.Cache(heads_first(self._project(context_BSD, self.key, self.key_bias)))
      self.cached_value = nnx.Cache(
        heads_first(self._project(context_BSD, self.value, self.value_bias))
      )
      return
    if batch_size % groups:
      raise ValueError(f"{batch_size} cache rows do not split into {groups} groups")
    self.cache_beams, self.cache_groups = beams, groups
    self.cache_block = block if block is not None and block < cache_length else None
    shape = (batch_size, self.config.num_heads, cache_length, self.config.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, jnp.dtype(self.config.dtype)))
    self.cached_value = nnx.Cache(jnp.zeros(shape, jnp.dtype(self.config.dtype)))

  def _queries_keys_values(self, x_BTD, context_BSD, use_cache: bool):
    """Q [B, T, N, H], and K, V [B, S, N, H] unless cross-attention reads them from the cache
    (then None)."""
    if context_BSD is None and not self.cross:
      q, k, v = project_together(
        x_BTD,
        [self.query[...], self.key[...], self.value[...]],
        None
        if not self.config.use_bias
        else [_value(b) for b in (self.query_bias, self.key_bias, self.value_bias)],
        jnp.dtype(self.config.dtype),
      )
      return q, k, v
    q_BTNH = self._project(x_BTD, self.query, self.query_bias)
    if use_cache and self.cross:
      return q_BTNH, None, None
    source_BSD = x_BTD if context_BSD is None else context_BSD
    k_BSNH = self._project(source_BSD, self.key, self.key_bias)
    return q_BTNH, k_BSNH, self._project(source_BSD, self.value, self.value_bias)

  def _keys_values(self, k_BSNH, v_BSNH, x_BTD, use_cache: bool, q_positions_BT, kv_positions_BS):
    if use_cache and self.cross:
      return self.cached_key[...], self.cached_value[...], None, None
    if self.uses_rope:
      k_BSNH = rotary_embedding(k_BSNH, kv_positions_BS)
    if not use_cache:
      return k_BSNH, v_BSNH, None, None
    # Self-attention decoding: each row writes its new entries at its own slot (see init_cache)
    # and attends to every slot up to them.
    if q_positions_BT is None:
      raise ValueError("decoding with the cache needs the new entries' positions")
    start_B = q_positions_BT[:, 0].astype(jnp.int32) * self.cache_beams
    self.cached_key[...] = write_rows(self.cached_key[...], heads_first(k_BSNH), start_B)
    self.cached_value[...] = write_rows(self.cached_value[...], heads_first(v_BSNH), start_B)
    visible_B1TC, filled_G = cache_view(
      start_B, self.cached_key.shape[2], x_BTD.shape[1], self.cache_groups
    )
    return self.cached_key[...], self.cached_value[...], visible_B1TC, filled_G

  def __call__(
    self,
    x_BTD: Float[Array, "B T D"],
    context_BSD: Float[Array, "B S D"] | None = None,
    *,
    mask: Bool[Array, ...] | None = None,
    is_causal: bool = False,
    q_positions_BT=None,
    kv_positions_BS=None,
    use_cache: bool = False,
    return_weights: bool = False,
  ):
    """Self-attention when `context` is None, else attention from x to context.

    Args:
      x_BTD: the queries' input [B, T, D].
      context_BSD: keys' and values' input [B, S, D] for cross-attention.
      mask: bool broadcastable to [B, N, T, S] (with the cache, to [B, N, T, cache_length]).
      q_positions_BT, kv_positions_BS: absolute positions, used by RoPE and, with the cache, to
        place the new keys (see `init_cache`).
      use_cache: use and update the KV cache (see `init_cache`).
      return_weights: also return the attention weights [B, N, T, S] (xla path).

    Returns:
      [B, T, D], or ([B, T, D], [B, N, T, S]) with `return_weights`.
    """
    q_BTNH, k_BSNH, v_BSNH = self._queries_keys_values(x_BTD, context_BSD, use_cache)
    if self.uses_rope:
      q_BTNH = rotary_embedding(q_BTNH, q_positions_BT)
      kv_positions_BS = q_positions_BT if kv_positions_BS is None else kv_positions_BS
    # With the cache, keys and values come heads first: [B, N, C, H].
    k, v, visible, filled = self._keys_values(
      k_BSNH, v_BSNH, x_BTD, use_cache, q_positions_BT, kv_positions_BS
    )
    if visible is not None:
      mask = visible if mask is None else (as_4d(mask) & visible)
      is_causal = False
    weights_BNTS = None
    dropping = self.config.attention_dropout_rate > 0 and not self.weights_dropout.deterministic
    if return_weights or self.sow_weights or dropping:
      k_BSNH, v_BSNH = (jnp.swapaxes(x, 1, 2) for x in (k, v)) if use_cache else (k, v)
      weights_BNTS = attention_weights(q_BTNH, k_BSNH, mask=mask, is_causal=is_causal)
      if self.sow_weights:
        self.sow(nnx.Intermediate, "attention_weights", weights_BNTS)
      dropped_BNTS = self.weights_dropout(weights_BNTS)
      out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", dropped_BNTS.astype(v_BSNH.dtype), v_BSNH)
    else:
      block = self.cache_block if filled is not None else None
      out_BTNH = attend(q_BTNH, k, v, mask, is_causal, use_cache, filled, block, self.config)
    y_BTD = merge_heads(
      out_BTNH, self.out[...], _value(self.out_bias), jnp.dtype(self.config.dtype)
    )
    return (y_BTD, weights_BNTS) if return_weights else y_BTD
