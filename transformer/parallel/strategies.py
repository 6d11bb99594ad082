"""The two ways a train step runs on many devices, chosen by `parallel.strategy`.

"jit": one `jax.jit` with explicit in/out shardings (the pjit model). Parameters and optimizer
  state are laid out by their logical axes (data, FSDP and tensor parallelism at once) and XLA's
  SPMD partitioner inserts the collectives. The old state is donated.
"shard_map": classic data parallelism, written per device as `jax.pmap` programs were: each
  device computes gradients of its rows, `lax.psum` adds them (and the token counts) over the
  data axis, and every device applies the same update to its replica.

Both take the batch as `steps.train_step` does: [B, ...], or k micro-batches [k, B, ...] with
gradient accumulation, rows split over the devices on axis 1.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec

from transformer.parallel.axes import DATA, FSDP, TENSOR
from transformer.parallel.mesh import batch_sharding, batch_spec, replicated
from transformer.train.step import Steps

STRATEGIES = ("jit", "shard_map")


def jit_train_step(steps: Steps, state_shardings, mesh: Mesh):
  """The pjit-style step: sharded state in, sharded state out, old state donated."""
  rows = batch_sharding(mesh, stacked=steps.grad_accum_steps > 1)
  return jax.jit(steps.train_step, in_shardings=(state_shardings, rows),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def shard_map_train_step(steps: Steps, mesh: Mesh):
  """The pmap-style step: replicated state, rows split over `data`, gradients psum-ed."""
  if mesh.shape[FSDP] != 1 or mesh.shape[TENSOR] != 1:
    raise ValueError(f"parallel.strategy=shard_map is data parallelism only, but the mesh is "
                     f"{dict(mesh.shape)}: set parallel.fsdp=1 and parallel.tensor=1, or use "
                     "parallel.strategy=jit")

  def per_device(state, batch):
    # Each device draws its own dropout masks: the same key everywhere would repeat them.
    grads, sums = steps.gradients(state.params, batch, state.step,
                                  device=jax.lax.axis_index(DATA))
    # Summed gradients and token counts from every device, then one exact division in apply.
    grads, sums = jax.lax.psum((grads, sums), DATA)
    return steps.apply(state, grads, sums)

  rows = batch_spec(stacked=steps.grad_accum_steps > 1)  # fsdp = 1: rows split over data
  # check_vma=False gives pmap's semantics: gradients of replicated parameters stay per-device
  # until the explicit psum (with it, JAX would insert that psum itself in the backward pass).
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), rows),
                         out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


def compile_train_step(strategy: str, steps: Steps, state_shardings, mesh: Mesh):
  if strategy == "jit":
    return jit_train_step(steps, state_shardings, mesh)
  if strategy == "shard_map":
    return shard_map_train_step(steps, mesh)
  raise ValueError(f"parallel.strategy={strategy!r} is unknown: use one of {STRATEGIES}")
