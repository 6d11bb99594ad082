"""Device meshes from the config, the divisibility they need, and the layout of batches on them."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.errors import UserError
from transformer.parallel.axes import DATA, FSDP, MESH_AXES, TENSOR
from transformer.parallel.config import ParallelConfig


def mesh_shape(parallel: ParallelConfig, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; one of them may be -1 to take the devices left over."""
  sizes = [int(parallel.data), int(parallel.fsdp), int(parallel.tensor)]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(
        f"parallel mesh {dict(zip(MESH_AXES, sizes))} does not divide the "
        f"{num_devices} devices: make the fixed axes' product divide {num_devices}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(
      f"parallel mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
      f"but {num_devices} are present: set one axis to -1 or match the count"
    )
  data, fsdp, tensor = sizes
  return data, fsdp, tensor


def make_mesh(parallel: ParallelConfig, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(parallel, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  )


def check_divisible(
  mesh: Mesh,
  *,
  num_heads: int,
  d_ff: int,
  d_model: int,
  vocab_size: int,
  batch_size: int | None = None,
) -> None:
  """Clear errors when a model dimension or the evaluation batch (`batch_size`, the run's
  data.eval_batch_size) cannot be split over its mesh axis."""
  tensor, fsdp = mesh.shape[TENSOR], mesh.shape[FSDP]
  for name, size, axis, ways in (
    ("model.num_heads", num_heads, "tensor", tensor),
    ("model.d_ff", d_ff, "tensor", tensor),
    ("model.d_model", d_model, "fsdp", fsdp),
    ("data.vocab_size", vocab_size, "tensor", tensor),
  ):
    if size % ways:
      raise UserError(
        f"{name}={size} is not divisible by the {axis} axis ({ways} devices): "
        f"choose parallel.{axis} dividing {size}"
      )
  if batch_size is not None and batch_size % data_ways(mesh):
    ways = data_ways(mesh)
    raise UserError(
      f"data.eval_batch_size={batch_size} does not split over data x fsdp = {ways} devices: "
      f"use a multiple of {ways}"
    )


def data_ways(mesh: Mesh) -> int:
  """How many pieces a batch's rows are split into: data x fsdp."""
  return mesh.shape[DATA] * mesh.shape[FSDP]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec((DATA, FSDP)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over data x fsdp."""
  sharding = batch_sharding(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, value)
    for key, value in local_batch.items()
  }
