"""Scaled dot-product attention (Section 3.2.1) in three implementations behind one function.

  Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Our H is the paper's d_k = d_v. Masks are boolean, True where a query may attend to a key, and
broadcast to [B, N, T, S]. A query that may attend to nothing (a fully masked row) gets a zero
output and zero weights in every implementation, never NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from transformer.model.config import TransformerConfig
from transformer.model.layers import param, rotary_embedding
from transformer.parallel.axes import BATCH, EMBED, HEADS, KV, LENGTH, constrain

IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "auto")

# Finite stand-in for -inf: keeps exp() and its gradient free of NaN on fully masked rows.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _as_4d(mask: Bool[Array, "..."] | None) -> Bool[Array, "b n t s"] | None:
  if mask is None:
    return None
  if mask.ndim > 4:
    raise ValueError(f"attention mask has rank {mask.ndim}; it must broadcast to [B, N, T, S]")
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape).astype(jnp.bool_)


def causal_mask(q_len: int, kv_len: int, q_offset: int | jax.Array = 0) -> Bool[Array, "1 1 T S"]:
  """True where key position s <= query position t + q_offset (no peeking at later tokens)."""
  q_pos_T1 = jnp.arange(q_len)[:, None] + q_offset
  return (jnp.arange(kv_len)[None, :] <= q_pos_T1)[None, None]


def padding_mask(ids_BS: jax.Array, pad_id: int) -> Bool[Array, "B 1 1 S"]:
  """True at real (non-padding) key positions."""
  return (ids_BS != pad_id)[:, None, None, :]


def attention_logits(q_BTNH: Float[Array, "B T N H"],
                     k_BSNH: Float[Array, "B S N H"]) -> Float[Array, "B N T S"]:
  """The scaled dot products Q K^T / sqrt(d_k), in float32.

  The scale keeps the logits' variance at 1 for unit-variance q and k; without it large d_k
  pushes softmax into regions of vanishing gradient (Section 3.2.1, footnote 4).
  """
  scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
  return jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale


def attention_weights(q_BTNH: Float[Array, "B T N H"], k_BSNH: Float[Array, "B S N H"], *,
                      mask: Bool[Array, "..."] | None = None,
                      is_causal: bool = False) -> Float[Array, "B N T S"]:
  """softmax(Q K^T / sqrt(d_k)) in float32, masked entries exactly zero."""
  logits_BNTS = attention_logits(q_BTNH, k_BSNH)
  mask = _combine(_as_4d(mask), is_causal, q_BTNH.shape[1], k_BSNH.shape[1])
  if mask is None:
    return jax.nn.softmax(logits_BNTS, axis=-1)
  weights_BNTS = jax.nn.softmax(jnp.where(mask, logits_BNTS, _MASKED), axis=-1)
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
  out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask, is_causal=is_causal,
                                          implementation=implementation)
  mask = _combine(mask, is_causal, q_BTNH.shape[1], k_BSNH.shape[1])
  if mask is None:
    return out_BTNH
  # jax.nn averages all values on a fully masked row; we define that row's output as zero.
  any_key_BNT = jnp.broadcast_to(
      jnp.any(mask, axis=-1), (q_BTNH.shape[0], q_BTNH.shape[2], q_BTNH.shape[1]))
  return out_BTNH * jnp.transpose(any_key_BNT, (0, 2, 1))[..., None].astype(out_BTNH.dtype)


# --------------------------------------------------------------------------------------------
# Blockwise attention: the keys are visited in blocks of K with an online softmax (Milakov &
# Gimelshein 2018; FlashAttention, Dao et al. 2022), so no [T, S] matrix ever exists: forward
# and backward memory is O(T x K). The backward pass recomputes each block's probabilities from
# the saved log-sum-exp instead of storing them.
#
# Two schedules share the per-block math below:
#   full    one scan over key blocks, every query at once ([T, K] blocks): the fewest, largest
#           products, for bidirectional attention (and causal attention when T != S);
#   causal  self-attention with is_causal (T == S) skips most of the masked upper half of
#           [T, T]. The lower triangle is cut into squares along the diagonal ("leaves" of up to
#           LEAF_BLOCKS key blocks, run by the full schedule with the causal mask) plus
#           rectangles: at every level the second half of each 2L-long segment attends to its
#           first half, for L = leaf, 2 leaf, ..., T / 2. The segments of one level become extra
#           heads of one full-schedule call with T / 2 query rows, so each level is a handful of
#           large products. At T = 2048, K = 256 this computes 9/16 of the [T, T] scores.
#           Each level continues the online softmax of the queries it serves from where the
#           smaller pieces left it; the backward pass needs only the global log-sum-exp, so each
#           piece's gradients simply add up.
# --------------------------------------------------------------------------------------------

def _heads_major(x_BTNH):
  """[B, T, N, H] -> [B, N, T, H]: every per-block product becomes a GEMM batched over (B, N)."""
  return jnp.transpose(x_BTNH, (0, 2, 1, 3))


def _key_blocks(x_BNS_, block, axis: int = 2):
  """Splits the key axis into blocks and puts the block index first, for a scan over it:
  [B, N, S, H] -> [S/K, B, N, K, H], or with axis=3 [B, N, H, S] -> [S/K, B, N, H, K]."""
  shape = x_BNS_.shape
  blocked = x_BNS_.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])
  return jnp.moveaxis(blocked, axis, 0)


def _unblock(x_JBNKH):
  """[S/K, B, N, K, ...] -> [B, N, S, ...]: the inverse of `_key_blocks`."""
  x_BNJK_ = jnp.moveaxis(x_JBNKH, 0, 2)
  return x_BNJK_.reshape(x_BNJK_.shape[:2] + (-1,) + x_BNJK_.shape[4:])


def _transposed(x_BNTH):
  """[B, N, T, H] -> [B, N, H, T]: one copy outside a scan, so that every product inside it
  multiplies row-major operands; on CPU a product that contracts its operand's leading axis
  (the [T, K]^T x [T, H] of dK and dV) runs at about two thirds of the row-major rate."""
  return jnp.swapaxes(x_BNTH, 2, 3)


def _mask_blocks(mask, block, num_blocks):
  """Splits the key axis of a [b, n, t, s] mask (s may be 1) into per-block slices."""
  if mask.shape[-1] == 1:
    return jnp.broadcast_to(mask[None], (num_blocks,) + mask.shape)
  b, n, t, _ = mask.shape
  return jnp.moveaxis(mask.reshape(b, n, t, num_blocks, block), 3, 0)


def _block_mask(mask_j, is_causal, j, q_len, block):
  if not is_causal:
    return mask_j
  causal = causal_mask(q_len, block, q_offset=-j * block)
  return causal if mask_j is None else mask_j & causal


def _block_inputs(key_blocks, v_BNSH, mask, block):
  """(block index, `key_blocks` as split by `_key_blocks`, value blocks, mask blocks): what a
  scan over key blocks reads."""
  num_blocks = v_BNSH.shape[2] // block
  return (jnp.arange(num_blocks), key_blocks, _key_blocks(v_BNSH, block),
          None if mask is None else _mask_blocks(mask, block, num_blocks))


def _online_softmax(carry, s_BNTK, v_BNKH, mask_j):
  """Folds one block of scores into the running (output, row max, row sum)."""
  out_BNTH, max_BNT, sum_BNT = carry
  if mask_j is not None:
    s_BNTK = jnp.where(mask_j, s_BNTK, _MASKED)
  new_max_BNT = jnp.maximum(max_BNT, s_BNTK.max(-1))
  p_BNTK = jnp.exp(s_BNTK - new_max_BNT[..., None])
  if mask_j is not None:
    p_BNTK = jnp.where(mask_j, p_BNTK, 0.0)
  correction_BNT = jnp.exp(max_BNT - new_max_BNT)
  pv_BNTH = jnp.einsum("BNTK,BNKH->BNTH", p_BNTK.astype(v_BNKH.dtype), v_BNKH,
                       preferred_element_type=jnp.float32)
  return (out_BNTH * correction_BNT[..., None] + pv_BNTH, new_max_BNT,
          sum_BNT * correction_BNT + p_BNTK.sum(-1))


def _empty_softmax(q_BNTH):
  b, n, t, h = q_BNTH.shape
  return (jnp.zeros((b, n, t, h), jnp.float32), jnp.full((b, n, t), _MASKED, jnp.float32),
          jnp.zeros((b, n, t), jnp.float32))


def _finish_softmax(carry):
  """(output / row sum, log-sum-exp); a row that saw no key gets zero output."""
  out_BNTH, max_BNT, sum_BNT = carry
  safe_sum_BNT = jnp.where(sum_BNT > 0, sum_BNT, 1.0)
  return out_BNTH / safe_sum_BNT[..., None], max_BNT + jnp.log(safe_sum_BNT)


def _tile_gradients(q_BNTH, q_BNHT, k_BNKH, k_BNHK, v_BNKH, d_out_BNTH, d_out_BNHT, lse_BNT,
                    delta_BNT, mask_BNKT):
  """FlashAttention-2's backward for one tile, on the transposed tile [K, T] so that all five
  products take row-major operands: (dQ^T, dK, dV) contributions, scale folded in q."""
  s_BNKT = jnp.einsum("BNKH,BNHT->BNKT", k_BNKH, q_BNHT, preferred_element_type=jnp.float32)
  p_BNKT = jnp.exp(s_BNKT - lse_BNT[:, :, None])
  if mask_BNKT is not None:
    p_BNKT = jnp.where(mask_BNKT, p_BNKT, 0.0)
  d_v_BNKH = jnp.einsum("BNKT,BNTH->BNKH", p_BNKT.astype(d_out_BNTH.dtype), d_out_BNTH,
                        preferred_element_type=jnp.float32)
  d_p_BNKT = jnp.einsum("BNKH,BNHT->BNKT", v_BNKH, d_out_BNHT, preferred_element_type=jnp.float32)
  d_s_BNKT = (p_BNKT * (d_p_BNKT - delta_BNT[:, :, None])).astype(q_BNTH.dtype)
  d_q_BNHT = jnp.einsum("BNHK,BNKT->BNHT", k_BNHK, d_s_BNKT, preferred_element_type=jnp.float32)
  # d(q.k * scale)/dk = scale * q: the pre-scaled q gives it directly.
  d_k_BNKH = jnp.einsum("BNKT,BNTH->BNKH", d_s_BNKT, q_BNTH, preferred_element_type=jnp.float32)
  return d_q_BNHT, d_k_BNKH, d_v_BNKH


# On CPU one scan step's scores, [heads, T, K] in float32, should stay near a core's L2 cache
# (1 MiB on the machines measured): with all 8 heads of a T = 2048 layer at once a step's scores
# take 8 MiB at K = 128 and every elementwise pass over them goes to L3 or memory. Heads are
# independent, so the scans run over groups of heads in turn. One bidirectional self-attention
# layer, forward+backward at T = 2048, K = 128, B = 1: 398 -> 328 ms with one head per step
# (median of 21 paired rounds); the attention core alone 1.4x faster.
#
# With several devices the heads stay together: a partitioned program would gather the batch
# and head axes a scan iterates over, and every device would compute every head.
CPU_SCORES_BYTES = 1 << 20


def groups_heads() -> bool:
  """Whether the blockwise scans visit the heads in cache-sized groups: on one CPU device."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def head_group(heads: int, q_len: int, block: int) -> int:
  """How many of the `heads` (batch x heads) one scan step takes: every one unless
  `groups_heads()`; else the largest divisor of `heads` whose [group, q_len, block] float32
  scores fit CPU_SCORES_BYTES."""
  if not groups_heads():
    return heads
  fit = max(1, CPU_SCORES_BYTES // (4 * q_len * block))
  return max(g for g in range(1, min(fit, heads) + 1) if heads % g == 0)


def _by_head_groups(fn, arrays, mask, group):
  """`fn(arrays, mask)` on `group` heads at a time: the [B, N, ...] arrays (and a mask that
  varies over B or N) are cut into [1, group, ...] slices that `lax.map` visits in turn."""
  b, n = arrays[0].shape[:2]
  if group >= b * n:
    return fn(arrays, mask)
  split = lambda x: x.reshape((b * n // group, 1, group) + x.shape[2:])
  shared = mask is None or mask.shape[:2] == (1, 1)
  masks = None if shared else split(jnp.broadcast_to(mask, (b, n) + mask.shape[2:]))
  out = jax.lax.map(lambda x: fn(x[0], mask if shared else x[1]),
                    (tuple(split(x) for x in arrays), masks))
  return jax.tree.map(lambda x: x.reshape((b, n) + x.shape[3:]), out)


def _full_forward(q_BNTH, k_BNSH, v_BNSH, mask, is_causal, block, carry=None):
  """The running (output, row max, row sum) after folding in every key block, starting from
  `carry` (nothing seen yet if None); `_finish_softmax` turns it into (output, log-sum-exp)."""
  b, n, t, _ = q_BNTH.shape

  def heads_forward(arrays, mask):
    q_BNTH, k_BNSH, v_BNSH, *carry = arrays

    def step(carry, x):
      j, k_BNHK, v_j, mask_j = x
      mask_j = _block_mask(mask_j, is_causal, j, t, block)
      s_BNTK = jnp.einsum("BNTH,BNHK->BNTK", q_BNTH, k_BNHK, preferred_element_type=jnp.float32)
      return _online_softmax(carry, s_BNTK, v_j, mask_j), None

    key_blocks = _key_blocks(_transposed(k_BNSH), block, axis=3)
    carry, _ = jax.lax.scan(step, tuple(carry), _block_inputs(key_blocks, v_BNSH, mask, block))
    return carry

  carry = _empty_softmax(q_BNTH) if carry is None else carry
  return _by_head_groups(heads_forward, (q_BNTH, k_BNSH, v_BNSH, *carry), mask,
                         head_group(b * n, t, block))


def _full_backward(q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT, mask, is_causal,
                   block):
  b, n, t, _ = q_BNTH.shape

  def heads_backward(arrays, mask):
    q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT = arrays
    q_BNHT, d_out_BNHT = _transposed(q_BNTH), _transposed(d_out_BNTH)

    def step(d_q_BNHT, x):
      j, (k_BNKH, k_BNHK), v_j, mask_j = x
      mask_j = _block_mask(mask_j, is_causal, j, t, block)
      mask_BNKT = None if mask_j is None else jnp.swapaxes(mask_j, 2, 3)
      d_q, d_k, d_v = _tile_gradients(q_BNTH, q_BNHT, k_BNKH, k_BNHK, v_j, d_out_BNTH,
                                      d_out_BNHT, lse_BNT, delta_BNT, mask_BNKT)
      return d_q_BNHT + d_q, (d_k, d_v)

    key_blocks = (_key_blocks(k_BNSH, block), _key_blocks(_transposed(k_BNSH), block, axis=3))
    d_q_BNHT, (d_k_blocks, d_v_blocks) = jax.lax.scan(
        step, jnp.zeros(q_BNHT.shape, jnp.float32),
        _block_inputs(key_blocks, v_BNSH, mask, block))
    return _transposed(d_q_BNHT), _unblock(d_k_blocks), _unblock(d_v_blocks)

  return _by_head_groups(heads_backward, (q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT),
                         mask, head_group(b * n, t, block))


# Leaves span up to this many key blocks. Larger leaves mean fewer levels of smaller batched
# products but more wasted scores above the diagonal; on CPU at T = 2048, K = 128 one block won
# (causal forward+backward 206-230 ms against 251-282 ms with 4, best of 7 in three rounds).
LEAF_BLOCKS = 1


def causal_leaf(length: int, block: int) -> tuple[int, int]:
  """(leaf, levels) of the causal schedule for T = `length` and key blocks of `block`.

  leaf * 2**levels >= length; the leaf is at most LEAF_BLOCKS blocks, and a whole number of
  blocks when longer than one. `blockwise_attention` pads T to leaf * 2**levels.
  """
  levels = max(0, math.ceil(math.log2(length / (LEAF_BLOCKS * block))))
  leaf = -(-length // 2 ** levels)
  if leaf > block:
    leaf = -(-leaf // block) * block
  return leaf, levels


def _segments(x_BNT_, size):
  """[B, N, T, ...] -> [B, N T / size, size, ...]: consecutive segments become extra heads of one
  attention call (a reshape, no copy: the heads-major layout keeps each segment contiguous)."""
  b, n, t = x_BNT_.shape[:3]
  return x_BNT_.reshape(b, n * (t // size), size, *x_BNT_.shape[3:])


def _pairs(x_BNT_, size):
  """[B, N, T, ...] -> [B, N, T / 2 size, 2, size, ...]: each 2 size segment split in halves."""
  b, n, t = x_BNT_.shape[:3]
  return x_BNT_.reshape(b, n, t // (2 * size), 2, size, *x_BNT_.shape[3:])


def _half(x_BNT_, size, second: bool):
  """The first or second halves of every 2 size segment, as extra heads:
  [B, N T / 2 size, size, ...]."""
  half = _pairs(x_BNT_, size)[:, :, :, int(second)]
  return half.reshape(half.shape[0], -1, *half.shape[3:])


def _update_half(x_BNT_, piece, size, second: bool, add: bool):
  """x with `piece` (shaped like `_half`'s output) written into, or added to, its first or
  second halves."""
  pairs = _pairs(x_BNT_, size)
  piece = piece.reshape(pairs.shape[:3] + pairs.shape[4:])
  at = pairs.at[:, :, :, int(second)]
  return (at.add(piece) if add else at.set(piece)).reshape(x_BNT_.shape)


def _causal_pieces(q_BNTH, mask, block):
  """(leaf, the rectangles' segment sizes leaf, 2 leaf, ..., T / 2, the key mask [B, N, T])."""
  b, n, t, _ = q_BNTH.shape
  leaf, levels = causal_leaf(t, block)
  key_mask_BNT = None if mask is None else jnp.broadcast_to(mask[:, :, 0], (b, n, t))
  return leaf, [leaf * 2 ** level for level in range(levels)], key_mask_BNT


def _piece_mask(key_mask_BNT, size, leaf: bool):
  """The key mask of the leaves or of one level's rectangles, with a row axis: [B, N', 1, size]."""
  if key_mask_BNT is None:
    return None
  keys = _segments(key_mask_BNT, size) if leaf else _half(key_mask_BNT, size, second=False)
  return keys[:, :, None]


def _causal_forward(q_BNTH, k_BNSH, v_BNSH, mask, block):
  """Leaves along the diagonal, then one rectangle call per level; each level continues the
  online softmax of the queries it serves from where the smaller pieces left it."""
  leaf, sizes, key_mask_BNT = _causal_pieces(q_BNTH, mask, block)
  carry = _full_forward(*(_segments(x, leaf) for x in (q_BNTH, k_BNSH, v_BNSH)),
                        _piece_mask(key_mask_BNT, leaf, True), True, block)
  carry = tuple(x.reshape(q_BNTH.shape[:3] + x.shape[3:]) for x in carry)
  for size in sizes:
    seen = tuple(_half(x, size, True) for x in carry)
    seen = _full_forward(_half(q_BNTH, size, True), _half(k_BNSH, size, False),
                         _half(v_BNSH, size, False), _piece_mask(key_mask_BNT, size, False),
                         False, block, carry=seen)
    carry = tuple(_update_half(x, h, size, True, add=False) for x, h in zip(carry, seen))
  return _finish_softmax(carry)


def _causal_backward(q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT, mask, block):
  """Each piece's FlashAttention backward with the global log-sum-exp; the gradients add."""
  leaf, sizes, key_mask_BNT = _causal_pieces(q_BNTH, mask, block)
  inputs = (q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT)
  grads = _full_backward(*(_segments(x, leaf) for x in inputs),
                         _piece_mask(key_mask_BNT, leaf, True), True, block)
  d_q_BNTH, d_k_BNSH, d_v_BNSH = (g.reshape(q_BNTH.shape) for g in grads)
  for size in sizes:
    q, d_out, lse, delta = (_half(x, size, True) for x in (q_BNTH, d_out_BNTH, lse_BNT,
                                                           delta_BNT))
    d_q, d_k, d_v = _full_backward(q, _half(k_BNSH, size, False), _half(v_BNSH, size, False),
                                   d_out, lse, delta, _piece_mask(key_mask_BNT, size, False),
                                   False, block)
    d_q_BNTH = _update_half(d_q_BNTH, d_q, size, True, add=True)
    d_k_BNSH = _update_half(d_k_BNSH, d_k, size, False, add=True)
    d_v_BNSH = _update_half(d_v_BNSH, d_v, size, False, add=True)
  return d_q_BNTH, d_k_BNSH, d_v_BNSH


def _skips_upper_half(is_causal, q, k, mask=None):
  """The causal schedule serves self-attention whose mask (if any) depends on keys only."""
  return is_causal and q.shape[1] == k.shape[1] and (mask is None or mask.shape[2] == 1)


def _blockwise_forward(q, k, v, mask, is_causal, block):
  """Returns the output [B, T, N, H] and the log-sum-exp [B, N, T]."""
  # The 1/sqrt(d_k) scale goes on q once instead of on every block of scores.
  q_BNTH = _heads_major(q) * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  k_BNSH, v_BNSH = _heads_major(k), _heads_major(v)
  if _skips_upper_half(is_causal, q, k, mask):
    out_BNTH, lse_BNT = _causal_forward(q_BNTH, k_BNSH, v_BNSH, mask, block)
  else:
    out_BNTH, lse_BNT = _finish_softmax(_full_forward(q_BNTH, k_BNSH, v_BNSH, mask, is_causal,
                                                      block))
  return _heads_major(out_BNTH).astype(q.dtype), lse_BNT


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_core(q, k, v, mask, is_causal, block):
  return _blockwise_forward(q, k, v, mask, is_causal, block)[0]


def _blockwise_core_fwd(q, k, v, mask, is_causal, block):
  out, lse = _blockwise_forward(q, k, v, mask, is_causal, block)
  return out, (q, k, v, mask, out, lse)


def _blockwise_core_bwd(is_causal, block, residuals, d_out_BTNH):
  q, k, v, mask, out, lse_BNT = residuals
  scale = 1.0 / math.sqrt(q.shape[-1])
  q_BNTH = _heads_major(q) * jnp.asarray(scale, q.dtype)
  k_BNSH, v_BNSH, d_out_BNTH = _heads_major(k), _heads_major(v), _heads_major(d_out_BTNH)
  # D_t = sum_h dO * O: the softmax Jacobian's correction term (FlashAttention-2, eq. for dS).
  delta_BNT = jnp.einsum("BTNH,BTNH->BNT", d_out_BTNH.astype(jnp.float32), out.astype(jnp.float32))
  if _skips_upper_half(is_causal, q, k, mask):
    grads = _causal_backward(q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT, mask, block)
  else:
    grads = _full_backward(q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT, mask,
                           is_causal, block)
  d_q_BNTH, d_k_BNSH, d_v_BNSH = grads
  return (_heads_major(d_q_BNTH * scale).astype(q.dtype), _heads_major(d_k_BNSH).astype(k.dtype),
          _heads_major(d_v_BNSH).astype(v.dtype), None)


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


def blockwise_attention(q_BTNH, k_BSNH, v_BSNH, mask=None, is_causal=False, block_size=256):
  """Memory-efficient exact attention; pads S to a multiple of the block and masks the padding.

  Causal self-attention (T == S, a key-only mask) pads queries and keys to leaf * 2**levels
  (see `causal_leaf`); the padded query rows are dropped from the output.
  """
  t, s = q_BTNH.shape[1], k_BSNH.shape[1]
  mask = _as_4d(mask)
  square = _skips_upper_half(is_causal, q_BTNH, k_BSNH, mask)
  if square:
    leaf, levels = causal_leaf(s, block_size)
    block, padded = min(block_size, leaf), leaf * 2 ** levels
  else:
    block = min(block_size, s)
    padded = -(-s // block) * block
  pad = padded - s
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    k_BSNH, v_BSNH = jnp.pad(k_BSNH, widths), jnp.pad(v_BSNH, widths)
    if square:
      q_BTNH = jnp.pad(q_BTNH, widths)
    if mask is None:
      mask = jnp.ones((1, 1, 1, s), jnp.bool_)
    if mask.shape[-1] == 1:
      mask = jnp.broadcast_to(mask, mask.shape[:3] + (s,))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=False)
  return _blockwise_core(q_BTNH, k_BSNH, v_BSNH, mask, is_causal, block)[:, :t]


def resolve_implementation(implementation: str, dtype, head_dim: int, kv_len: int,
                           q_len: int) -> str:
  """The implementation that "auto" stands for on this backend and these shapes."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is unknown: "
                     f"use one of {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
      and head_dim <= 128:
    return "cudnn"
  # Past ~1k x 1k the [T, S] score matrix costs more memory traffic than the blockwise loop.
  return "blockwise" if q_len * kv_len > 1024 * 1024 else "xla"


def dot_product_attention(q: Float[Array, "B T N H"], k: Float[Array, "B S N H"],
                          v: Float[Array, "B S N H"], *, mask: Bool[Array, "..."] | None = None,
                          is_causal: bool = False, implementation: str = "xla",
                          block_size: int = 256) -> Float[Array, "B T N H"]:
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
  implementation = resolve_implementation(implementation, q.dtype, q.shape[-1], k.shape[1],
                                          q.shape[1])
  mask = _as_4d(mask)
  if implementation == "xla":
    return _xla_attention(q, k, v, mask, is_causal)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v, mask, is_causal)
  return blockwise_attention(q, k, v, mask, is_causal, block_size)


class MultiHeadAttention(nnx.Module):
  """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

  The per-head projections are stored as one [D, N, H] tensor each (all heads in one einsum);
  the concatenation of heads followed by W^O is the [N, H, D] contraction in `out`.

  Decoding: after `init_cache`, calls with `decode=True` take the new positions only. Self-
  attention appends their keys and values to the cache; cross-attention reads the projected
  encoder output stored once by `init_cache(context=...)`.

  Inspection: with `sow_weights` set, each call also sows its weights [B, N, T, S] as
  `nnx.Intermediate` "attention_weights", so a caller can gather every layer's weights with
  `nnx.capture` without threading `return_weights` through the stacks (see
  `transformer.decode.visualize`).
  """

  # A plain (static) attribute: off, the fused attention path below runs unchanged.
  sow_weights: bool = False

  def __init__(self, config: TransformerConfig, *, cross: bool = False, rngs: nnx.Rngs):
    self.config, self.cross = config, cross
    d, n, h, w = config.d_model, config.num_heads, config.head_dim, config.weight_dtype
    # Glorot over fan_in = D and fan_out = N * H, as for the paper's d_model x d_k matrices.
    init_in = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0,
                                                out_axis=(1, 2))
    init_out = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1),
                                                 out_axis=2)
    self.query = param(rngs, init_in, (d, n, h), (EMBED, HEADS, KV), w)
    self.key = param(rngs, init_in, (d, n, h), (EMBED, HEADS, KV), w)
    self.value = param(rngs, init_in, (d, n, h), (EMBED, HEADS, KV), w)
    self.out = param(rngs, init_out, (n, h, d), (HEADS, KV, EMBED), w)
    zeros = nnx.initializers.zeros
    self.query_bias = param(rngs, zeros, (n, h), (HEADS, KV), w)
    self.key_bias = param(rngs, zeros, (n, h), (HEADS, KV), w)
    self.value_bias = param(rngs, zeros, (n, h), (HEADS, KV), w)
    self.out_bias = param(rngs, zeros, (d,), (EMBED,), w)
    self.weights_dropout = nnx.Dropout(config.attention_dropout_rate, rngs=rngs)
    # Filled by init_cache; declared as data so the cache is part of the module's state.
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)
    # Rotary positions belong to self-attention: source and target positions are not comparable.
    self.uses_rope = config.position == "rope" and not cross

  def _project(self, x_BTD, kernel: nnx.Param, bias: nnx.Param) -> Float[Array, "B T N H"]:
    dtype = self.config.compute_dtype
    y_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD.astype(dtype), kernel[...].astype(dtype))
    return constrain(y_BTNH + bias[...].astype(dtype)[None, None], (BATCH, LENGTH, HEADS, KV))

  def init_cache(self, batch_size: int, max_length: int,
                 context_BSD: Float[Array, "B S D"] | None = None) -> None:
    """Allocates the KV cache: empty [B, max_length, N, H] for self-attention, or the projected
    `context` (the encoder output) for cross-attention."""
    if self.cross:
      self.cached_key = nnx.Cache(self._project(context_BSD, self.key, self.key_bias))
      self.cached_value = nnx.Cache(self._project(context_BSD, self.value, self.value_bias))
      return
    shape = (batch_size, max_length, self.config.num_heads, self.config.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, self.config.compute_dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, self.config.compute_dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def _keys_values(self, x_BTD, context_BSD, decode: bool, kv_positions_BS):
    if decode and self.cross:
      return self.cached_key[...], self.cached_value[...], None
    source_BSD = x_BTD if context_BSD is None else context_BSD
    k_BSNH = self._project(source_BSD, self.key, self.key_bias)
    v_BSNH = self._project(source_BSD, self.value, self.value_bias)
    if self.uses_rope:
      k_BSNH = rotary_embedding(k_BSNH, kv_positions_BS)
    if not decode:
      return k_BSNH, v_BSNH, None
    # Self-attention decoding: write the new positions at cache_index, attend to all up to them.
    index = self.cache_index[...]
    start = (0, index, 0, 0)
    self.cached_key[...] = jax.lax.dynamic_update_slice(self.cached_key[...], k_BSNH, start)
    self.cached_value[...] = jax.lax.dynamic_update_slice(self.cached_value[...], v_BSNH, start)
    self.cache_index[...] = index + x_BTD.shape[1]
    visible = causal_mask(x_BTD.shape[1], self.cached_key.shape[1], q_offset=index)
    return self.cached_key[...], self.cached_value[...], visible

  def __call__(self, x_BTD: Float[Array, "B T D"], context_BSD: Float[Array, "B S D"] | None = None,
               *, mask: Bool[Array, "..."] | None = None, is_causal: bool = False,
               q_positions_BT=None, kv_positions_BS=None, decode: bool = False,
               return_weights: bool = False):
    """Self-attention when `context` is None, else attention from x to context.

    Args:
      x_BTD: the queries' input [B, T, D].
      context_BSD: keys' and values' input [B, S, D] for cross-attention.
      mask: bool broadcastable to [B, N, T, S] (in decode mode, to [B, N, T, max_length]).
      q_positions_BT, kv_positions_BS: absolute positions, used by RoPE only.
      decode: use and update the KV cache (see `init_cache`).
      return_weights: also return the attention weights [B, N, T, S] (xla path).

    Returns:
      [B, T, D], or ([B, T, D], [B, N, T, S]) with `return_weights`.
    """
    q_BTNH = self._project(x_BTD, self.query, self.query_bias)
    if self.uses_rope:
      q_BTNH = rotary_embedding(q_BTNH, q_positions_BT)
      kv_positions_BS = q_positions_BT if kv_positions_BS is None else kv_positions_BS
    k_BSNH, v_BSNH, visible = self._keys_values(x_BTD, context_BSD, decode, kv_positions_BS)
    if visible is not None:
      mask = visible if mask is None else (_as_4d(mask) & visible)
      is_causal = False
    weights_BNTS = None
    use_weights = return_weights or self.sow_weights or (
        self.config.attention_dropout_rate > 0 and not self.weights_dropout.deterministic)
    if use_weights:
      weights_BNTS = attention_weights(q_BTNH, k_BSNH, mask=mask, is_causal=is_causal)
      if self.sow_weights:
        self.sow(nnx.Intermediate, "attention_weights", weights_BNTS)
      dropped_BNTS = self.weights_dropout(weights_BNTS)
      out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", dropped_BNTS.astype(v_BSNH.dtype), v_BSNH)
    else:
      out_BTNH = dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask, is_causal=is_causal,
                                       implementation=self.config.attention,
                                       block_size=self.config.attention_block_size)
    dtype = self.config.compute_dtype
    y_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH.astype(dtype), self.out[...].astype(dtype))
    y_BTD = y_BTD + self.out_bias[...].astype(dtype)[None, None]
    y_BTD = constrain(y_BTD, (BATCH, LENGTH, EMBED))
    return (y_BTD, weights_BNTS) if return_weights else y_BTD
