"""Device meshes from the config, and the shardings of state and batches on them."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.parallel.axes import DATA, FSDP, MESH_AXES, RULES, TENSOR


def mesh_shape(parallel, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; one of them may be -1 to take the devices left over."""
  sizes = [int(parallel.data), int(parallel.fsdp), int(parallel.tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f"parallel mesh {dict(zip(MESH_AXES, sizes))} has more than one -1: "
                     "let at most one axis fill in the rest")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"parallel mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"parallel mesh {dict(zip(MESH_AXES, sizes))} does not divide the "
                       f"{num_devices} devices: make the fixed axes' product divide {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"parallel mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
                     f"but {num_devices} are present: set one axis to -1 or match the count")
  return tuple(sizes)


def make_mesh(parallel, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(parallel, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_divisible(mesh: Mesh, *, num_heads: int, d_ff: int, d_model: int, vocab_size: int,
                    batch_size: int | None = None) -> None:
  """Clear errors when a model or batch dimension cannot be split over its mesh axis."""
  tensor, fsdp = mesh.shape[TENSOR], mesh.shape[FSDP]
  for name, size, axis, ways in (("model.num_heads", num_heads, "tensor", tensor),
                                 ("model.d_ff", d_ff, "tensor", tensor),
                                 ("model.d_model", d_model, "fsdp", fsdp),
                                 ("model.vocab_size", vocab_size, "tensor", tensor)):
    if size % ways:
      raise ValueError(f"{name}={size} is not divisible by the {axis} axis ({ways} devices): "
                       f"choose parallel.{axis} dividing {size}")
  if batch_size is not None and batch_size % (mesh.shape[DATA] * fsdp):
    raise ValueError(f"batch of {batch_size} rows does not split over data x fsdp = "
                     f"{mesh.shape[DATA] * fsdp} devices: use a multiple of it")


def logical_shardings(tree, mesh: Mesh, rules=RULES):
  """NamedShardings for an nnx state (or any tree of Variables) from their logical axis names."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(tree)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(stacked: bool = False) -> PartitionSpec:
  """Rows split over data x fsdp, everything else replicated.

  A stack of micro-batches [k, B, ...] (gradient accumulation) keeps k whole on every device and
  splits its rows, axis 1, so each micro-batch is spread over all devices.
  """
  return PartitionSpec(None, (DATA, FSDP)) if stacked else PartitionSpec((DATA, FSDP))


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(stacked))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 stacked: bool = False) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over data x fsdp.

  `stacked`: the arrays are micro-batches [k, B_local, ...], their rows on axis 1.
  """
  sharding = batch_sharding(mesh, stacked)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}


def put_global(tree, shardings):
  """Places host arrays (identical on every process) onto global shardings, shard by shard."""
  def put(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)
