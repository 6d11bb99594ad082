"""The model as explicit decoding state: what a loop carries, what stays fixed, one jit per graph.

A `jax.lax.while_loop` carries arrays, not modules. After `init_cache` the model is split three
ways (`split_cache`):
  graphdef    the module structure (static; hashable, so it can key a jit cache);
  step cache  self-attention keys/values [R, T, N, H] (an LSTM's h and c [R, L, D]) and the
              decoder's position counter [R]: every entry has the rows R first. Every step
              reads and advances it: the loop carries it, and beam search over one row per
              beam reorders its rows;
  rest        parameters, dropout RNG state, and the cross-attention cache (the encoder output
              projected once by `init_cache`, with its padding mask). Decoding only reads these,
              so they stay out of the carry and are never gathered between beams.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

# Written once by init_cache, only read while decoding (see the module docstring).
_READ_ONLY_CACHE = nnx.Any(nnx.PathContains("cross_attention"), nnx.PathContains("memory_mask"))
STEP_CACHE = nnx.All(nnx.Cache, nnx.Not(_READ_ONLY_CACHE))
MEMORY_CACHE = nnx.All(nnx.Cache, _READ_ONLY_CACHE)


def split_cache(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, step cache, rest) of a model whose caches `init_cache` has allocated."""
  graphdef, cache, *rest = nnx.split(model, STEP_CACHE, ...)  # one State per filter
  return graphdef, cache, rest[0]


def split_memory(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
  """(graphdef, step cache, memory cache, parameters and the rest): the rest of `split_cache`
  in two, for a caller that replaces the memory of some rows (`transformer.decode.engine`)."""
  graphdef, cache, memory, params = nnx.split(model, STEP_CACHE, MEMORY_CACHE, ...)  # type: ignore[misc]
  return graphdef, cache, memory, params


def call_cached(
  graphdef: nnx.GraphDef,
  cache: nnx.State,
  rest: nnx.State | tuple[nnx.State, ...],
  fn: Callable[[nnx.Module], Any],
) -> tuple[Any, nnx.State]:
  """Runs `fn(model)` on the merged model; returns its output and the advanced step cache.

  Pure: the caller's `cache` is not modified, so it can be a `while_loop` carry. `rest` is the
  other State of `split_cache`, or the other two of `split_memory`.
  """
  model = nnx.merge(graphdef, cache, *(rest if isinstance(rest, tuple) else (rest,)))
  out = fn(model)
  return out, nnx.state(model, STEP_CACHE)


def gather_beams(cache: nnx.State, parent_BW: Int[Array, "B W"]) -> nnx.State:
  """Beam w of sentence b takes the cache of beam parent_BW[b, w] of the same sentence.

  Per-row entries have R = B * W rows, beam w of sentence b at row b * W + w. The gather runs
  along the beam axis of a [B, W, ...] view, so a batch axis sharded over devices stays local.
  Scalars pass through unchanged.
  """
  batch, beams = parent_BW.shape

  def gather(x_R_):
    if x_R_.ndim == 0:
      return x_R_
    if x_R_.shape[0] != batch * beams:  # a cache stored with another axis first
      raise ValueError(
        f"a decoding cache entry of shape {x_R_.shape} does not have the "
        f"{batch} x {beams} beam rows first"
      )
    x_BW_ = x_R_.reshape(batch, beams, *x_R_.shape[1:])
    index_BW_ = parent_BW.reshape(batch, beams, *(1,) * (x_R_.ndim - 1))
    return jnp.take_along_axis(x_BW_, index_BW_, axis=1).reshape(x_R_.shape)

  return jax.tree.map(gather, cache)


def jit_with_model(fn: Callable | None = None, *, static_argnames: Sequence[str] = ()):
  """`jax.jit` for `fn(model, *args, **kwargs)`, traced once per (model graph, statics, shapes).

  The wrapper splits the model: its graphdef becomes a static argument (equal for every model
  of one architecture and mode) and its state a traced one, so translating batch after batch of
  one shape, or with a second checkpoint of the same model, reuses one compilation. `fn` gets a
  merged copy in eval mode (no dropout); what it does to that copy (the caches `init_cache`
  adds) is not written back, unlike `nnx.jit`, so the caller's model keeps its graph and the next
  call hits the same cache entry. The jitted pure function is `wrapper.pure(graphdef, state, ...)`.
  """
  if fn is None:
    return functools.partial(jit_with_model, static_argnames=static_argnames)

  @functools.partial(jax.jit, static_argnames=("graphdef", *static_argnames))
  def pure(graphdef: nnx.GraphDef, state: nnx.State, *args, **kwargs):
    model = nnx.merge(graphdef, state)
    model.eval()
    return fn(model, *args, **kwargs)

  @functools.wraps(fn)
  def wrapper(model: nnx.Module, *args, **kwargs):
    graphdef, state = nnx.split(model)
    return pure(graphdef, state, *args, **kwargs)

  wrapper.pure = pure  # type: ignore[attr-defined]
  return wrapper
