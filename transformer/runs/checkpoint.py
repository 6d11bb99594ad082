"""Orbax checkpoints: asynchronous, atomic, kept K at a time, restored onto any mesh.

A checkpoint holds the train state and the data iterator's position, so a resumed run continues
with exactly the batches an uninterrupted one would see. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save never damages an earlier step. A step
that is unreadable all the same (a disk error, a truncated copy) is skipped for the previous one,
and deleted so that training can write that step again.
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

  def __init__(self, directory: str | Path, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    """`read_only`: another run's directory, neither created nor cleaned of its temporary steps
    (that run may be writing one)."""
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=asynchronous,
                                           cleanup_tmp_directories=not read_only)
    # Handlers named up front, so a step's metadata is readable before anything is restored.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    """Completed steps; Orbax's temporary directories of unfinished saves are not listed."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores `step`, or the newest readable checkpoint, onto `abstract_state`'s shardings.

    A truncated or corrupted step is reported and skipped for the previous good one; once one
    restores, the unreadable newer steps are deleted, so that training writes them afresh
    instead of skipping steps that "exist". A checkpoint of another model or optimizer is not
    corruption: it stops the restore and nothing is deleted.

    Returns:
      (state, data_state, step).
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}: train first, or point "
                            "--workdir at a run that saved one")
    unreadable = []
    for candidate in candidates:
      # Compared before restoring: a restore that fails part-way leaves Orbax's pending reads
      # to fail noisily later, and a foreign checkpoint is no reason to try an older one.
      mismatch = self._structure_mismatch(candidate, abstract_state)
      if mismatch:
        raise CheckpointError(
            f"checkpoint at {self.directory / str(candidate)} was written with another "
            f"model/optimizer config ({mismatch}): use a new workdir or the old config")
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        _check_finite(restored["state"], candidate)
      except (ValueError, OSError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        log.warning("checkpoint step %d in %s is unreadable (%s: %s)", candidate,
                    self.directory, type(error).__name__, first_line)
        unreadable.append(candidate)
        continue
      self._delete(unreadable)
      return restored["state"], dict(restored["data"] or {}), candidate
    if step is not None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable")
    raise CheckpointError(f"every checkpoint in {self.directory} is unreadable "
                          f"(steps {candidates}): delete the directory to start afresh")

  def _structure_mismatch(self, step: int, abstract_state: Any) -> str | None:
    """How the saved arrays' names and shapes differ from `abstract_state`'s; None when they
    agree or the metadata itself is unreadable (then the step is corrupt, not foreign)."""
    try:
      saved = _shapes(self.manager.item_metadata(step)["state"])
    except Exception:  # noqa: BLE001  any failure to read metadata means a damaged step
      return None
    return _describe_difference(saved, _shapes(abstract_state))

  def _delete(self, steps: list[int]) -> None:
    for step in steps:
      self.manager.delete(step)
      log.warning("deleted unreadable checkpoint step %d in %s; training writes it again",
                  step, self.directory)

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


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/decoder/embed/table/value": shape} for a state, its abstract twin or its Orbax
  metadata, whose paths differ only in key types (attribute, dict key, index)."""
  def name(key):
    for attribute in ("key", "idx", "name"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)
  return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _describe_difference(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
  """The first name or shape of each kind that differs, in words; None when all agree."""
  params_first = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params"), k))
  only_saved = params_first(saved.keys() - wanted.keys())
  only_wanted = params_first(wanted.keys() - saved.keys())
  reshaped = params_first(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
  parts = []
  if reshaped:
    parts.append(f"{len(reshaped)} arrays differ in shape, e.g. {reshaped[0]} saved "
                 f"{saved[reshaped[0]]}, now {wanted[reshaped[0]]}")
  if only_wanted:
    parts.append(f"{len(only_wanted)} arrays are new, e.g. {only_wanted[0]}")
  if only_saved:
    parts.append(f"{len(only_saved)} saved arrays are gone, e.g. {only_saved[0]}")
  return "; ".join(parts) or None


def average_params(checkpointer: Checkpointer, abstract_state: Any, last: int):
  """The mean of the parameters of the last `last` checkpoints (the paper averages 5 or 20).

  An unreadable one is left out with a warning: the average of the others still stands.
  """
  total, averaged = None, []
  for step in checkpointer.steps()[-last:]:
    try:
      state, _, _ = checkpointer.restore(abstract_state, step)
    except CheckpointError as error:
      log.warning("averaging leaves out checkpoint step %d: %s", step, error)
      continue
    total = state.params if total is None else jax.tree.map(lambda a, b: a + b, total, state.params)
    averaged.append(step)
  if not averaged:
    raise CheckpointError(f"none of the last {last} checkpoints in {checkpointer.directory} is "
                          "readable: set average_last_checkpoints=0 to use the final parameters")
  return jax.tree.map(lambda x: x / len(averaged), total), averaged
