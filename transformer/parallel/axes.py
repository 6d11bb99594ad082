"""Logical axis names of parameters and activations, and how they map onto mesh axes.

Modules name their axes logically (`EMBED`, `HEADS`, ...); `RULES` maps each name to mesh axes in
this one place, so a layout change (FSDP, tensor parallelism) never touches model code.
Activations have their own name for the model width, `ACT_EMBED`: a weight's D axis is split
over fsdp, but an activation's rows already are, and a mesh axis can split only one dimension.
"""

from __future__ import annotations

import math

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV = "kv"  # the per-head width H
MLP = "mlp"
VOCAB = "vocab"
ACT_EMBED = "activation_embed"

# Mesh axes: data parallelism, fully-sharded data parallelism, tensor (Megatron) parallelism.
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical name -> mesh axes. Batches split over data x fsdp; weights over fsdp on their model
# dimension (ZeRO-3 style) and over tensor on heads / mlp / vocab (Megatron-style column and row
# splits, so each attention or FFN block needs one all-reduce).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  (BATCH, (DATA, FSDP)),
  (LENGTH, None),
  (EMBED, FSDP),
  (HEADS, TENSOR),
  (KV, None),
  (MLP, TENSOR),
  (VOCAB, TENSOR),
  (ACT_EMBED, None),  # after each block's all-reduce the residual stream is whole per row
)


def logical_to_spec(names: tuple[str | None, ...], rules=None) -> PartitionSpec:
  """PartitionSpec for logical `names` under `rules` (default: the rules now in context)."""
  rules = dict(rules if rules is not None else spmd.get_logical_axis_rules())
  return PartitionSpec(*(rules.get(name) if name is not None else None for name in names))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation's layout to its logical names under a mesh of `MESH_AXES`.

  The rules are those in context (`nnx.logical_axis_rules`), else `RULES`. Without such a mesh
  (one device, tests) and inside `shard_map` (per-device code) it is the identity, so model code
  stays free of parallelism branches.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = logical_to_spec(names, spmd.get_logical_axis_rules() or RULES)
  # A dimension its mesh axes do not divide (a decoding batch of beams, one sentence) stays whole.
  spec = PartitionSpec(
    *(axes if size % _ways(mesh, axes) == 0 else None for size, axes in zip(x.shape, spec))
  )
  return jax.lax.with_sharding_constraint(x, spec)


def _ways(mesh, axes: str | tuple[str, ...] | None) -> int:
  """How many pieces `axes` of `mesh` split a dimension into."""
  names = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[name] for name in names)
