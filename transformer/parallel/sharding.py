"""Placing trees of arrays on a mesh by their logical axis names, and their abstract twins."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.parallel.axes import RULES


def logical_shardings(tree: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedShardings for a tree holding nnx Variables (parameters, optimizer state built from
  them) from their logical axis names; leaves without names are replicated."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(tree)
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def put_global(tree: Any, shardings: Any) -> Any:
  """Places host arrays (identical on every process) onto global shardings, shard by shard."""

  def put(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def shard(tree: Any, mesh: Mesh) -> tuple[Any, Any]:
  """(`tree` placed on `mesh` by its logical axis names, the shardings used)."""
  shardings = logical_shardings(tree, mesh)
  return put_global(tree, shardings), shardings


def abstract_with_shardings(shardings: Any, tree: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s arrays carrying `shardings`: a restore target that places
  each array as it is read."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
