"""Identical layers stacked for `nnx.scan` (`model.scan_layers`), and parameter names between the
stacked and the unrolled layouts.

An unrolled stack is an `nnx.List` of L layers, its parameters named per layer
("encoder/layers/0/self_attention/query", [D, N, H]). A stacked one is a single layer module
whose arrays all carry a leading L axis ("encoder/layers/self_attention/query", [L, D, N, H]);
`scan_stack` runs it as one `nnx.scan`, so XLA compiles one layer per stack instead of L. Values
and gradients are those of the unrolled stack (tests/model/test_stacking.py).

Exported models and everything that loads parameters keep the unrolled names:
`unstacked_params` and `params_in_layout` convert a flat {name: array} dict either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import spmd

# The stacks of the three families; a stacked name has no layer index after "layers/".
_STACKED = re.compile(r"^((?:encoder|decoder)/layers)/(?!\d+/)(.+)$")
_UNROLLED = re.compile(r"^((?:encoder|decoder)/layers)/(\d+)/(.+)$")
# The logical axis name of the stacked L axis: None, so a stack is never split over devices by
# layer (each device holds every layer's slice of a sharded weight, as in the unrolled model).
_LAYER_AXIS = {nnx.PARTITION_NAME: None}


def stack_modules(layers: Sequence[nnx.Module]) -> nnx.Module:
  """L modules of one structure -> one module of that structure whose every array (parameters,
  dropout RNG keys and counts) is the L arrays stacked on a new leading axis.

  Built from unrolled layers rather than under `nnx.vmap`, so a stacked model initialises to
  exactly the parameters of the unrolled model with the same seed.
  """
  graphdef, _ = nnx.split(layers[0])
  states = [nnx.state(layer) for layer in layers]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  # Logical axis names gain the L axis in front (`nnx.vmap` does the same with its metadata).
  return nnx.merge(graphdef, spmd.add_axis(stacked, 0, _LAYER_AXIS))


def unstack_module(stacked: nnx.Module) -> list[nnx.Module]:
  """The L independent layer modules of a stacked one (their arrays are copies)."""
  graphdef, state = nnx.split(stacked)
  count = jax.tree.leaves(state)[0].shape[0]
  layers = []
  for i in range(count):
    state_i = jax.tree.map(lambda x, i=i: x[i], state)
    layers.append(nnx.merge(graphdef, spmd.remove_axis(state_i, 0, _LAYER_AXIS)))
  return layers


def scan_stack(
  stacked: nnx.Module,
  x: jax.Array,
  apply: Callable[[Any, jax.Array], jax.Array],
  *,
  all_outputs: bool = False,
):
  """apply(layer L-1, ... apply(layer 0, x)) as one `nnx.scan` over the stacked layers.

  Each layer's state updates (dropout RNG counts) are written back into `stacked`. With
  `all_outputs`, returns (last output, every layer's output stacked [L, ...]).
  """

  # Tree mode (the module as a pytree): a layer's state is written back only where it changed
  # (dropout's RNG counts in training), so a model made at an outer trace level (decoding
  # without the cache inside a while_loop) scans in eval mode without touching its variables.
  @nnx.scan(
    in_axes=(nnx.Carry, 0),
    out_axes=(nnx.Carry, 0) if all_outputs else nnx.Carry,
    graph=False,
  )
  def body(x, layer):
    y = apply(layer, x)
    return (y, y) if all_outputs else y

  return body(x, stacked)


def unstacked_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """A flat {name: array} dict with every stacked parameter split into its L per-layer ones
  ("encoder/layers/x" [L, ...] -> "encoder/layers/0/x" ... ); other names are kept."""
  out: dict[str, Any] = {}
  for name, value in params.items():
    match = _STACKED.match(name)
    if match is None:
      out[name] = value
      continue
    value = np.asarray(value)
    for i in range(value.shape[0]):
      out[f"{match[1]}/{i}/{match[2]}"] = value[i]
  return out


def stacked_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `unstacked_params`: per-layer parameters of the stacks joined into one
  [L, ...] array each. Layers must be numbered 0 .. L-1 without gaps."""
  out: dict[str, Any] = {}
  layers: dict[str, dict[int, Any]] = {}
  for name, value in params.items():
    match = _UNROLLED.match(name)
    if match is None:
      out[name] = value
    else:
      layers.setdefault(f"{match[1]}/{match[3]}", {})[int(match[2])] = value
  for name, by_index in layers.items():
    if sorted(by_index) != list(range(len(by_index))):
      raise ValueError(f"parameter {name} has layers {sorted(by_index)}, not 0 .. L-1")
    out[name] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
  return out


def params_in_layout(params: Mapping[str, Any], wanted: Iterable[str]) -> dict[str, Any]:
  """`params` (either layout) in the layout of the parameter names `wanted`: stacked if any
  wanted name is a stacked one, else unrolled."""
  unrolled = unstacked_params(params)
  if any(_STACKED.match(name) for name in wanted):
    return stacked_params(unrolled)
  return unrolled
