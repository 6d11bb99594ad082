"""Attention masks: boolean, True where a query may attend to a key, broadcast to [B, N, T, S]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

# Finite stand-in for -inf: keeps exp() and its gradient free of NaN on fully masked rows.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def as_4d(mask: Bool[Array, ...] | None) -> Bool[Array, "b n t s"] | None:
  """A mask of rank <= 4 as a boolean rank-4 array (leading axes of size 1 added)."""
  if mask is None:
    return None
  if mask.ndim > 4:
    raise ValueError(f"attention mask has rank {mask.ndim}; it must broadcast to [B, N, T, S]")
  return jnp.asarray(mask).reshape((1,) * (4 - mask.ndim) + mask.shape).astype(jnp.bool_)


def causal_mask(q_len: int, kv_len: int, q_offset: int | jax.Array = 0) -> Bool[Array, "1 1 T S"]:
  """True where key position s <= query position t + q_offset (no peeking at later tokens)."""
  q_pos_T1 = jnp.arange(q_len)[:, None] + q_offset
  return (jnp.arange(kv_len)[None, :] <= q_pos_T1)[None, None]


def padding_mask(ids_BS: jax.Array, pad_id: int) -> Bool[Array, "B 1 1 S"]:
  """True at real (non-padding) key positions."""
  return (ids_BS != pad_id)[:, None, None, :]


def segment_mask(q_segments_BT: jax.Array, kv_segments_BS: jax.Array) -> Bool[Array, "B 1 T S"]:
  """True where query and key belong to the same packed sentence (segment ids 1, 2, ...); keys of
  segment 0, the padding, are hidden from every query."""
  same_BTS = q_segments_BT[:, :, None] == kv_segments_BS[:, None, :]
  return (same_BTS & (kv_segments_BS != 0)[:, None, :])[:, None]
