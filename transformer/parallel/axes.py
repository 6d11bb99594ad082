"""Logical axis names of parameters and activations, and how they map onto mesh axes.

Modules name their axes logically (`EMBED`, `HEADS`, ...); `RULES` maps each name to mesh axes in
this one place, so a layout change (FSDP, tensor parallelism) never touches model code.
"""

from __future__ import annotations

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV = "kv"          # the per-head width H
MLP = "mlp"
VOCAB = "vocab"

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
)


def logical_to_spec(names: tuple[str | None, ...], rules=None) -> PartitionSpec:
  """PartitionSpec for logical `names` under `rules` (default: the rules now in context)."""
  rules = dict(rules if rules is not None else spmd.get_logical_axis_rules())
  return PartitionSpec(*(rules.get(name) if name is not None else None for name in names))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation's layout to its logical names when a mesh and rules are in context.

  Outside `jax.set_mesh(...)` and `nnx.logical_axis_rules(...)` (one device, tests) it is the
  identity, so model code stays free of parallelism branches.
  """
  rules = spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))
