"""Blockwise exact attention with O(T x K) memory for forward and backward.

The keys are visited in blocks of K with an online softmax (Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022), so no [T, S] matrix ever exists. The backward pass recomputes
each block's probabilities from the saved log-sum-exp instead of storing them.

Two schedules share the per-block math below:
  full    one scan over key blocks, every query at once ([T, K] blocks): the fewest, largest
          products, for bidirectional attention (and causal attention when T != S);
  causal  self-attention with is_causal (T == S) skips most of the masked upper half of
          [T, T]. The lower triangle is cut into squares along the diagonal ("leaves" of up to
          LEAF_BLOCKS key blocks, run by the full schedule with the causal mask) plus
          rectangles: at every level the second half of each 2L-long segment attends to its
          first half, for L = leaf, 2 leaf, ..., T / 2. The segments of one level become extra
          heads of one full-schedule call with T / 2 query rows, so each level is a handful of
          large products. At T = 2048, K = 256 this computes 9/16 of the [T, T] scores.
          Each level continues the online softmax of the queries it serves from where the
          smaller pieces left it; the backward pass needs only the global log-sum-exp, so each
          piece's gradients simply add up.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from transformer.model.masks import MASKED, as_4d, causal_mask


def _heads_major(x_BTNH):
  """[B, T, N, H] -> [B, N, T, H]: every per-block product becomes a GEMM batched over (B, N)."""
  return jnp.transpose(x_BTNH, (0, 2, 1, 3))


def _key_blocks(x_BNS_, block, axis: int = 2):
  """Splits the key axis into blocks and puts the block index first, for a scan over it:
  [B, N, S, H] -> [S/K, B, N, K, H], or with axis=3 [B, N, H, S] -> [S/K, B, N, H, K]."""
  shape = x_BNS_.shape
  blocked = x_BNS_.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1 :])
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
  return (
    jnp.arange(num_blocks),
    key_blocks,
    _key_blocks(v_BNSH, block),
    None if mask is None else _mask_blocks(mask, block, num_blocks),
  )


def _online_softmax(carry, s_BNTK, v_BNKH, mask_j):
  """Folds one block of scores into the running (output, row max, row sum)."""
  out_BNTH, max_BNT, sum_BNT = carry
  if mask_j is not None:
    s_BNTK = jnp.where(mask_j, s_BNTK, MASKED)
  new_max_BNT = jnp.maximum(max_BNT, s_BNTK.max(-1))
  p_BNTK = jnp.exp(s_BNTK - new_max_BNT[..., None])
  if mask_j is not None:
    p_BNTK = jnp.where(mask_j, p_BNTK, 0.0)
  correction_BNT = jnp.exp(max_BNT - new_max_BNT)
  pv_BNTH = jnp.einsum(
    "BNTK,BNKH->BNTH", p_BNTK.astype(v_BNKH.dtype), v_BNKH, preferred_element_type=jnp.float32
  )
  return (
    out_BNTH * correction_BNT[..., None] + pv_BNTH,
    new_max_BNT,
    sum_BNT * correction_BNT + p_BNTK.sum(-1),
  )


def _empty_softmax(q_BNTH):
  b, n, t, h = q_BNTH.shape
  return (
    jnp.zeros((b, n, t, h), jnp.float32),
    jnp.full((b, n, t), MASKED, jnp.float32),
    jnp.zeros((b, n, t), jnp.float32),
  )


def _finish_softmax(carry):
  """(output / row sum, log-sum-exp); a row that saw no key gets zero output."""
  out_BNTH, max_BNT, sum_BNT = carry
  safe_sum_BNT = jnp.where(sum_BNT > 0, sum_BNT, 1.0)
  return out_BNTH / safe_sum_BNT[..., None], max_BNT + jnp.log(safe_sum_BNT)


def _tile_gradients(
  q_BNTH, q_BNHT, k_BNKH, k_BNHK, v_BNKH, d_out_BNTH, d_out_BNHT, lse_BNT, delta_BNT, mask_BNKT
):
  """FlashAttention-2's backward for one tile, on the transposed tile [K, T] so that all five
  products take row-major operands: (dQ^T, dK, dV) contributions, scale folded in q."""
  s_BNKT = jnp.einsum("BNKH,BNHT->BNKT", k_BNKH, q_BNHT, preferred_element_type=jnp.float32)
  p_BNKT = jnp.exp(s_BNKT - lse_BNT[:, :, None])
  if mask_BNKT is not None:
    p_BNKT = jnp.where(mask_BNKT, p_BNKT, 0.0)
  d_v_BNKH = jnp.einsum(
    "BNKT,BNTH->BNKH",
    p_BNKT.astype(d_out_BNTH.dtype),
    d_out_BNTH,
    preferred_element_type=jnp.float32,
  )
  d_p_BNKT = jnp.einsum("BNKH,BNHT->BNKT", v_BNKH, d_out_BNHT, preferred_element_type=jnp.float32)
  d_s_BNKT = (p_BNKT * (d_p_BNKT - delta_BNT[:, :, None])).astype(q_BNTH.dtype)
  d_q_BNHT = jnp.einsum("BNHK,BNKT->BNHT", k_BNHK, d_s_BNKT, preferred_element_type=jnp.float32)
  # d(q.k * scale)/dk = scale * q: the pre-scaled q gives it directly.
  d_k_BNKH = jnp.einsum("BNKT,BNTH->BNKH", d_s_BNKT, q_BNTH, preferred_element_type=jnp.float32)
  return d_q_BNHT, d_k_BNKH, d_v_BNKH


# On CPU one scan step's scores, [heads, T, K] in float32, should stay near a core's L2 cache
# (1 MiB on the machines measured): all 8 heads of a T = 2048 layer take 16 MiB at K = 256, and
# every elementwise pass of the online softmax over them would go to L3 or memory. Heads are
# independent, so the scans visit groups of heads in turn (1.4x on the attention core at
# T = 2048; benchmarks/README.md, "Attention vs recurrence").
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
  out = jax.lax.map(
    lambda x: fn(x[0], mask if shared else x[1]), (tuple(split(x) for x in arrays), masks)
  )
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
  return _by_head_groups(
    heads_forward, (q_BNTH, k_BNSH, v_BNSH, *carry), mask, head_group(b * n, t, block)
  )


def _full_backward(q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT, mask, is_causal, block):
  b, n, t, _ = q_BNTH.shape

  def heads_backward(arrays, mask):
    q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT = arrays
    q_BNHT, d_out_BNHT = _transposed(q_BNTH), _transposed(d_out_BNTH)

    def step(d_q_BNHT, x):
      j, (k_BNKH, k_BNHK), v_j, mask_j = x
      mask_j = _block_mask(mask_j, is_causal, j, t, block)
      mask_BNKT = None if mask_j is None else jnp.swapaxes(mask_j, 2, 3)
      d_q, d_k, d_v = _tile_gradients(
        q_BNTH, q_BNHT, k_BNKH, k_BNHK, v_j, d_out_BNTH, d_out_BNHT, lse_BNT, delta_BNT, mask_BNKT
      )
      return d_q_BNHT + d_q, (d_k, d_v)

    key_blocks = (_key_blocks(k_BNSH, block), _key_blocks(_transposed(k_BNSH), block, axis=3))
    d_q_BNHT, (d_k_blocks, d_v_blocks) = jax.lax.scan(
      step, jnp.zeros(q_BNHT.shape, jnp.float32), _block_inputs(key_blocks, v_BNSH, mask, block)
    )
    return _transposed(d_q_BNHT), _unblock(d_k_blocks), _unblock(d_v_blocks)

  return _by_head_groups(
    heads_backward,
    (q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT),
    mask,
    head_group(b * n, t, block),
  )


# Leaves span up to this many key blocks. Larger leaves mean fewer levels of smaller batched
# products but more wasted scores above the diagonal; one block was the fastest on CPU
# (causal forward+backward at T = 2048 against leaves of 4 blocks).
LEAF_BLOCKS = 1


def causal_leaf(length: int, block: int) -> tuple[int, int]:
  """(leaf, levels) of the causal schedule for T = `length` and key blocks of `block`.

  leaf * 2**levels >= length; the leaf is at most LEAF_BLOCKS blocks, and a whole number of
  blocks when longer than one. `blockwise_attention` pads T to leaf * 2**levels.
  """
  levels = max(0, math.ceil(math.log2(length / (LEAF_BLOCKS * block))))
  leaf = -(-length // 2**levels)
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
  return leaf, [leaf * 2**level for level in range(levels)], key_mask_BNT


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
  q_leaves, k_leaves, v_leaves = (_segments(x, leaf) for x in (q_BNTH, k_BNSH, v_BNSH))
  carry = _full_forward(
    q_leaves, k_leaves, v_leaves, _piece_mask(key_mask_BNT, leaf, True), True, block
  )
  carry = tuple(x.reshape(q_BNTH.shape[:3] + x.shape[3:]) for x in carry)
  for size in sizes:
    seen = tuple(_half(x, size, True) for x in carry)
    seen = _full_forward(
      _half(q_BNTH, size, True),
      _half(k_BNSH, size, False),
      _half(v_BNSH, size, False),
      _piece_mask(key_mask_BNT, size, False),
      False,
      block,
      carry=seen,
    )
    carry = tuple(_update_half(x, h, size, True, add=False) for x, h in zip(carry, seen))
  return _finish_softmax(carry)


def _causal_backward(q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT, mask, block):
  """Each piece's FlashAttention backward with the global log-sum-exp; the gradients add."""
  leaf, sizes, key_mask_BNT = _causal_pieces(q_BNTH, mask, block)
  inputs = (q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT)
  q, k, v, d_out, lse, delta = (_segments(x, leaf) for x in inputs)
  grads = _full_backward(
    q, k, v, d_out, lse, delta, _piece_mask(key_mask_BNT, leaf, True), True, block
  )
  d_q_BNTH, d_k_BNSH, d_v_BNSH = (g.reshape(q_BNTH.shape) for g in grads)
  for size in sizes:
    q, d_out, lse, delta = (_half(x, size, True) for x in (q_BNTH, d_out_BNTH, lse_BNT, delta_BNT))
    d_q, d_k, d_v = _full_backward(
      q,
      _half(k_BNSH, size, False),
      _half(v_BNSH, size, False),
      d_out,
      lse,
      delta,
      _piece_mask(key_mask_BNT, size, False),
      False,
      block,
    )
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
    out_BNTH, lse_BNT = _finish_softmax(
      _full_forward(q_BNTH, k_BNSH, v_BNSH, mask, is_causal, block)
    )
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
    grads = _full_backward(
      q_BNTH, k_BNSH, v_BNSH, d_out_BNTH, lse_BNT, delta_BNT, mask, is_causal, block
    )
  d_q_BNTH, d_k_BNSH, d_v_BNSH = grads
  return (
    _heads_major(d_q_BNTH * scale).astype(q.dtype),
    _heads_major(d_k_BNSH).astype(k.dtype),
    _heads_major(d_v_BNSH).astype(v.dtype),
    None,
  )


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


def blockwise_attention(q_BTNH, k_BSNH, v_BSNH, mask=None, is_causal=False, block_size=256):
  """Memory-efficient exact attention; pads S to a multiple of the block and masks the padding.

  Causal self-attention (T == S, a key-only mask) pads queries and keys to leaf * 2**levels
  (see `causal_leaf`); the padded query rows are dropped from the output.
  """
  t, s = q_BTNH.shape[1], k_BSNH.shape[1]
  mask = as_4d(mask)
  square = _skips_upper_half(is_causal, q_BTNH, k_BSNH, mask)
  if square:
    leaf, levels = causal_leaf(s, block_size)
    block, padded = min(block_size, leaf), leaf * 2**levels
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
