"""Orbax checkpoints: asynchronous, atomic, kept K at a time, restored onto any mesh.

A checkpoint holds the train state and the data iterator's position, so a resumed run continues
with exactly the batches an uninterrupted one would see. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save never damages an earlier step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was required."""


class Checkpointer:
  """Saves and restores {"state": train state, "data": iterator position} under `directory`."""

  def __init__(self, directory: str | Path, *, keep: int = 3, asynchronous: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

    A truncated or corrupted step is reported and skipped for the previous good one.

    Returns:
      (state, data_state, step).
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}: train first, or point "
                            "--workdir at a run that saved one")
    for candidate in candidates:
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        _check_finite(restored["state"], candidate)
        return restored["state"], dict(restored["data"] or {}), candidate
      except (ValueError, OSError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an earlier one",
                    candidate, self.directory, type(error).__name__, first_line)
    raise CheckpointError(f"every checkpoint in {self.directory} is unreadable "
                          f"(steps {candidates}): delete the directory to start afresh")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_finite(state: Any, step: int) -> None:
  """A checkpoint with NaN or Inf counts as corrupted. Computed on the global arrays (one jit),
  so it also works when each process holds only its own shards."""
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  if floats and not bool(jax.jit(lambda xs: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in xs])))(floats)):
    raise ValueError(f"non-finite values in checkpoint step {step}")


def average_params(checkpointer: Checkpointer, abstract_state: Any, last: int):
  """The mean of the parameters of the last `last` checkpoints (the paper averages 5 or 20)."""
  steps = checkpointer.steps()[-last:]
  total = None
  for step in steps:
    state, _, _ = checkpointer.restore(abstract_state, step)
    total = state.params if total is None else jax.tree.map(lambda a, b: a + b, total, state.params)
  return jax.tree.map(lambda x: x / len(steps), total), steps
