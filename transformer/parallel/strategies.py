"""The two ways a train step runs on many devices, chosen by `parallel.strategy`.

"jit": one `jax.jit` with explicit in/out shardings (the pjit model). Parameters and optimizer
  state are laid out by their logical axes (data, FSDP and tensor parallelism at once) and XLA's
  SPMD partitioner inserts the collectives. The old state is donated.
"shard_map": classic data parallelism, written per device as `jax.pmap` programs were: each
  device computes gradients of its rows, `lax.psum` adds them (and the token counts) over the
  data axis, and every device applies the same update to its replica.

Both take the step's functions as `transformer.train.step.make_steps` builds them (any object
with the `StepFunctions` attributes) and batches [B, ...] with rows split over data x fsdp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
from jax.sharding import Mesh, PartitionSpec

from transformer.errors import UserError
from transformer.parallel.axes import DATA, FSDP, TENSOR
from transformer.parallel.mesh import batch_sharding, replicated


@runtime_checkable
class StepFunctions(Protocol):
  """The pure pieces of a train step that a strategy composes."""

  @property
  def gradients(self) -> Callable:
    """(params, batch, step, device=None) -> (summed-loss gradients, metric sums)."""

  @property
  def apply(self) -> Callable:
    """(state, summed gradients, metric sums) -> (state, metrics)."""

  @property
  def train_step(self) -> Callable:
    """(state, batch, key) -> (state, metrics): gradients, then apply."""

  @property
  def dropout_key(self) -> jax.Array:
    """The key the dropout masks are drawn from (folded with the step)."""


class TrainStep(NamedTuple):
  """A compiled step `jitted(state, batch, key)` and the dropout key a call passes it.

  The key is an argument, not a constant of the program: a run with another seed finds the
  program in the persistent compilation cache instead of compiling it again (about 3 s of the
  shakespeare_char model's start on one core).
  """

  jitted: Any  # a jax.jit function: called, or lowered
  key: jax.Array

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.key)

  def lower(self, state, batch):
    """The step lowered for these arguments (`jax.stages.Lowered`: its text, `compile()`)."""
    return self.jitted.lower(state, batch, self.key)


def jit_train_step(steps: StepFunctions, state_shardings: Any, mesh: Mesh) -> TrainStep:
  """The pjit-style step: sharded state in, sharded state out, old state donated."""
  jitted = jax.jit(
    steps.train_step,
    in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
    out_shardings=(state_shardings, replicated(mesh)),
    donate_argnums=0,
  )
  return TrainStep(jitted, steps.dropout_key)


def shard_map_train_step(steps: StepFunctions, mesh: Mesh) -> TrainStep:
  """The pmap-style step: replicated state, rows split over `data`, gradients psum-ed."""
  if mesh.shape[FSDP] != 1 or mesh.shape[TENSOR] != 1:
    raise UserError(
      f"parallel.strategy=shard_map is data parallelism only, but the mesh is "
      f"{dict(mesh.shape)}: set parallel.fsdp=1 and parallel.tensor=1, or use "
      "parallel.strategy=jit"
    )

  def per_device(state, batch, key):
    # Each device draws its own dropout masks: the same key everywhere would repeat them.
    device = jax.lax.axis_index(DATA)
    grads, sums = steps.gradients(state.params, batch, state.step, device=device, key=key)
    # Summed gradients and token counts from every device, then one exact division in apply.
    grads, sums = jax.lax.psum((grads, sums), DATA)
    return steps.apply(state, grads, sums)

  # check_vma=False gives pmap's semantics: gradients of replicated parameters stay per-device
  # until the explicit psum (with it, JAX would insert that psum itself in the backward pass).
  mapped = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(PartitionSpec(), batch_sharding(mesh).spec, PartitionSpec()),
    out_specs=(PartitionSpec(), PartitionSpec()),
    check_vma=False,
  )
  return TrainStep(jax.jit(mapped, donate_argnums=0), steps.dropout_key)


def compile_train_step(
  strategy: str, steps: StepFunctions, state_shardings: Any, mesh: Mesh
) -> TrainStep:
  """The train step of `strategy` ("jit" or "shard_map"), jitted for `mesh`."""
  if strategy == "jit":
    return jit_train_step(steps, state_shardings, mesh)
  if strategy == "shard_map":
    return shard_map_train_step(steps, mesh)
  raise UserError(f"parallel.strategy={strategy!r} is unknown: use jit or shard_map")
