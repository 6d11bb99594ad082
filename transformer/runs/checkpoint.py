"""Orbax checkpoints: asynchronous, atomic, verified, kept K at a time, restored onto any mesh.

A checkpoint holds the train state, the data iterator's position and a checksum of every array,
so a resumed run continues with exactly the batches an uninterrupted one would see, from exactly
the values that were saved. Orbax writes each step into a temporary directory and renames it
when complete, so a crash mid-save never damages an earlier step. A step that is unreadable all
the same, or whose arrays no longer match their checksums (a disk error, a truncated or changed
file), is named in one warning and skipped for the previous one; training then deletes it and
writes that step again.

The checksum of an array is two sums, mod 2^32, over its bits as 32-bit words, each word first
mixed with its position by MurmurHash3's finalizer (under two seeds): every bit of a word and of
its position affects all 32 bits of what is summed, so any change (a flipped sign bit, two
swapped values, a cut, a zeroed block) alters the pair except with probability about 2^-64, and
sums do not depend on how the array is sharded or reduced (jitted over the global arrays, so
every process of a multi-host run gets the same numbers). The record of the data stream's
position (and the run's elapsed time) is covered by a SHA-256 of its JSON. A checkpoint without
checksums is read only if it predates them (its stream record has the format of version 0.1).

The record also names what the stream's batches are made of (`Record.inputs`: the tokenizer
file's SHA-256, the training text's fingerprint), so that a resumed or loaded run is refused
when either was replaced since; checkpoints written before that was recorded are read unchecked.
A step folder is trusted only if it holds that step: one renamed (or copied in) under another
number is refused, and a folder that Orbax cannot see as a step at all is named in a warning
(resuming is refused while such a folder holds a checkpoint newer than every step folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from transformer.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError):
  """No usable checkpoint where one was required."""


# The "data" item of a checkpoint: {"format": 2, "stream": position, "elapsed_s": seconds}, and
# "inputs": {"tokenizer": SHA-256, "train_text": fingerprint} once they were recorded.
RECORD_FORMAT = 2
CHECKSUM_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class Record:
  """What a checkpoint keeps besides the train state: the input stream's position (the next
  batch), the seconds the run had spent when it was saved (None: not recorded) and what the
  batches were made of (`inputs`: {"tokenizer": the tokenizer file's SHA-256, "train_text": the
  training split's fingerprint, when it has one}; None in a checkpoint written before)."""

  stream: dict[str, Any]
  elapsed_s: float | None = None
  inputs: dict[str, str] | None = None

  def to_json(self) -> dict[str, Any]:
    values = {"format": RECORD_FORMAT, "stream": self.stream, "elapsed_s": self.elapsed_s}
    if self.inputs is not None:
      values["inputs"] = self.inputs
    return values

  @classmethod
  def from_json(cls, values: dict[str, Any]) -> Record:
    """A saved record; one of the earlier layout (the stream's position alone) too."""
    if "format" not in values:
      return cls(stream=values)
    if values["format"] != RECORD_FORMAT or not isinstance(values.get("stream"), dict):
      raise ValueError(f"its data record is of an unknown layout ({sorted(values)})")
    inputs = values.get("inputs")
    if inputs is not None and not (
      isinstance(inputs, dict) and all(isinstance(v, str) for v in inputs.values())
    ):
      raise ValueError(f"its record of the inputs is of an unknown layout ({inputs!r})")
    return cls(stream=values["stream"], elapsed_s=values.get("elapsed_s"), inputs=inputs)

  @property
  def predates_checksums(self) -> bool:
    """Written by version 0.1, before checksums existed ({"epoch", "batch_index"})."""
    return "batch_index" in self.stream


class Checkpointer:
  """Saves and restores {"state": train state, "data": iterator position, "checksums": of the
  state's arrays} under `directory`."""

  def __init__(
    self,
    directory: str | Path,
    *,
    keep: int = 3,
    asynchronous: bool = True,
    read_only: bool = False,
    inputs: dict[str, str] | None = None,
  ):
    """`read_only`: another run's directory, neither created nor cleaned of its temporary steps
    (that run may be writing one). `inputs`: what this run's batches are made of, recorded in
    every record saved without its own (`Record.inputs`)."""
    self.directory = Path(directory).absolute()
    self.read_only = read_only
    self.inputs = inputs
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=not read_only,
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=not read_only,
    )
    # Handlers named up front, so a step's metadata is readable before anything is restored.
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "checksums": ocp.JsonCheckpointHandler(),
      },
    )
    _warn_of_strangers(self.directory)

  def steps(self) -> list[int]:
    """Completed steps; Orbax's temporary directories of unfinished saves are not listed."""
    return sorted(self.manager.all_steps())

  def check_resumable(self) -> None:
    """Refuses to resume when a folder that is not named by a step number holds a checkpoint
    saved after the newest step folder: a step renamed ("best", "1400.bak") would otherwise send
    the run back to an older step, or to step 0, to train again what it had trained."""
    steps = self.steps()
    newest = _committed_at(self.directory / str(steps[-1])) if steps else None
    try:
      folders = sorted(p for p in self.directory.iterdir() if not is_step_name(p.name))
    except OSError:
      return
    for folder in folders:
      committed = _committed_at(folder)
      if committed is None or (newest is not None and committed <= newest):
        continue
      if steps:
        resume = f"it was saved after step {steps[-1]}, the newest step folder, where the run "
        resume += "would resume"
      else:
        resume = "no folder is named by a step, so the run would start again from step 0"
      raise CheckpointError(
        f"{folder} holds a checkpoint, but {resume}: rename it back to its step number to "
        f"resume from it, or move it out of {self.directory}"
      )

  def save(self, step: int, state: Any, record: Record, *, force: bool = False) -> None:
    if record.inputs is None and self.inputs is not None:
      record = dataclasses.replace(record, inputs=self.inputs)
    data = record.to_json()
    sums = {"format": CHECKSUM_FORMAT, "arrays": checksums(state), "data": _json_sha256(data)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data),
      checksums=ocp.args.JsonSave(sums),
    )
    with _unfinished_removed_on_failure(self.directory, self.read_only):
      self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Record, int]:
    """Restores `step`, or the newest good checkpoint, onto `abstract_state`'s shardings.

    A damaged step is named in a warning and skipped for the previous good one; once one
    restores, the damaged newer steps are deleted, so that training writes them afresh instead
    of skipping steps that "exist". A checkpoint of another model or optimizer is not damage:
    it stops the restore and nothing is deleted.

    Returns:
      (state, record, step).
    """

    def target(candidate: int) -> Any:
      # Compared before restoring: a restore that fails part-way leaves Orbax's pending reads
      # to fail noisily later, and a foreign checkpoint is no reason to try an older one.
      mismatch = _structure_mismatch(self.manager, candidate, abstract_state)
      if mismatch:
        raise CheckpointError(
          f"checkpoint at {self.directory / str(candidate)} was written with another "
          f"model/optimizer config ({mismatch}): use a new workdir or the old config"
        )
      return abstract_state

    restored, data_state, good, damaged = self._first_good(step, target)
    self._delete(damaged)
    return restored, data_state, good

  def restore_saved(self, step: int | None = None) -> tuple[Any, Record, int]:
    """(state, record, step) of `step`, or of the newest good checkpoint, as it was saved
    (structure from its metadata), on this host's first device: for reading a run, not for
    resuming it. Damaged steps are named in a warning and skipped, never deleted."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(candidate: int) -> Any:
      try:
        tree = self.manager.item_metadata(candidate)["state"]
      except Exception:
        return None
      return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)

    restored, record, good, _ = self._first_good(step, target)
    return restored, record, good

  def _first_good(self, step: int | None, target) -> tuple[Any, Record, int, list[int]]:
    """The first of `step` (or every step, newest first) that restores and verifies; the
    damaged ones tried before it."""
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise CheckpointError(
        f"no checkpoint in {self.directory}: train first, or point "
        "--workdir at a run that saved one"
      )
    damaged = []
    for candidate in candidates:
      try:
        abstract = target(candidate)
        if abstract is None:
          raise UserError("its metadata cannot be read")
        state, record = self._restore_verified(candidate, abstract)
      except CheckpointError:
        raise
      except Exception as error:
        log.warning(
          "checkpoint step %d in %s is damaged (%s); %s",
          candidate,
          self.directory,
          _first_line(error),
          "trying the one before it" if step is None else "it cannot be used",
        )
        damaged.append(candidate)
        continue
      return state, record, candidate, damaged
    raise _none_good(self.directory, step, candidates)

  def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, Record]:
    has_checksums = (self.directory / str(step) / "checksums").exists()
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
    if has_checksums:
      items["checksums"] = ocp.args.JsonRestore()
    state, record = _verified(
      self.manager.restore(step, args=ocp.args.Composite(**items)), has_checksums
    )
    self._check_step(step, state)
    return state, record

  def _check_step(self, step: int, state: Any) -> None:
    """Refuses a step folder renamed (or copied in) under another number: resuming would log one
    step and continue from another, and the next saves would overwrite or skip the wrong ones.
    Checked once the checksums hold, so the stored step is the one that was saved."""
    stored = _stored_step(state)
    if stored is not None and stored != step:
      raise CheckpointError(
        f"checkpoint folder {self.directory / str(step)} holds step {stored}, not {step}: it "
        f"was renamed; rename it back to {stored}, or move it out of {self.directory}"
      )

  def _delete(self, steps: list[int]) -> None:
    for step in steps:
      self.manager.delete(step)
      log.warning(
        "deleted damaged checkpoint step %d in %s; training writes it again", step, self.directory
      )

  def wait(self) -> None:
    with _unfinished_removed_on_failure(self.directory, self.read_only):
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _verified(restored: Any, has_checksums: bool) -> tuple[Any, Record]:
  """The restored state and its data record, once the checksums (or, for a checkpoint older
  than them, finiteness) hold."""
  state, data = restored["state"], dict(restored["data"] or {})
  if not data:
    raise ValueError("its data record (the input stream's position) is empty")
  record = Record.from_json(data)
  if has_checksums:
    _verify(state, data, restored["checksums"] or {})
  elif record.predates_checksums:  # version 0.1: only values that cannot be right are caught
    _check_finite(state)
  else:
    raise ValueError("its checksums are missing (every checkpoint since version 0.1 has them)")
  return state, record


def _stored_step(state: Any) -> int | None:
  """The step counter saved in a train state (a `TrainState`, or the dict of one read as saved);
  None for a state without one."""
  step = state.get("step") if isinstance(state, dict) else getattr(state, "step", None)
  if step is None:
    return None
  if isinstance(step, jax.Array):  # replicated: each process holds the whole scalar
    step = step.addressable_data(0)
  return int(np.asarray(step))


def is_step_name(name: str) -> bool:
  """Whether Orbax reads a folder of this name as a step: the step's number as `str(step)`
  writes it. "0006" or "٦" (an Arabic-Indic six) pass `str.isdigit` but are no step to Orbax."""
  return name.isascii() and name.isdigit() and str(int(name)) == name


def _warn_of_strangers(directory: Path) -> None:
  """Names, in one warning, what in `directory` Orbax will never read as a step: a step folder
  renamed to something that is not its number is otherwise ignored without a word, and the run
  restarts from an older step or from scratch."""
  try:
    names = sorted(p.name for p in directory.iterdir())
  except OSError:  # not there (yet): Orbax creates it, or names the problem itself
    return
  strangers = [n for n in names if not is_step_name(n) and ".orbax-checkpoint-tmp" not in n]
  if strangers:
    log.warning(
      "%s holds %s, which %s no checkpoint (a step's folder is named by its step number) and "
      "%s ignored: rename a checkpoint folder back to its step, or move %s out",
      directory,
      ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else ""),
      "is" if len(strangers) == 1 else "are",
      "is" if len(strangers) == 1 else "are",
      "it" if len(strangers) == 1 else "them",
    )


def _committed_at(folder: Path) -> int | None:
  """When Orbax finished saving the step in `folder` (nanoseconds), None if it holds none."""
  try:
    metadata = json.loads((folder / "_CHECKPOINT_METADATA").read_text(encoding="utf-8"))
    return int(metadata["commit_timestamp_nsecs"])
  except (OSError, ValueError, TypeError, KeyError):
    return None


def check_tokenizer(record: Record, step: int, tokenizer_path: Path) -> None:
  """Refuses a tokenizer file other than the one checkpoint `step` was trained with: the same
  number of pieces in another order (a permuted vocab.json, another run's spm.model) would read
  every embedding as another piece, silently. A checkpoint written before the tokenizer was
  recorded is not checked."""
  saved = (record.inputs or {}).get("tokenizer")
  if saved is None or not Path(tokenizer_path).is_file():  # a missing file is named where read
    return
  if saved != file_sha256(tokenizer_path):
    raise UserError(
      f"{tokenizer_path} is not the tokenizer checkpoint step {step} was trained with (its "
      "SHA-256 differs from the one the checkpoint recorded): put the run's own "
      f"{Path(tokenizer_path).name} back, or train in a new --workdir"
    )


def file_sha256(path: str | Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _none_good(directory: Path, step: int | None, candidates: list[int]) -> CheckpointError:
  if step is not None:
    return CheckpointError(
      f"checkpoint step {step} in {directory} is damaged: pick another step, or train again"
    )
  return CheckpointError(
    f"every checkpoint in {directory} is damaged (steps {candidates}): delete the directory to "
    "start afresh"
  )


def _structure_mismatch(manager: Any, step: int, abstract_state: Any) -> str | None:
  """How the saved arrays' names and shapes differ from `abstract_state`'s; None when they
  agree or the metadata itself is unreadable (then the step is damaged, not foreign)."""
  try:
    saved = _shapes(manager.item_metadata(step)["state"])
  except Exception:
    return None
  return _describe_difference(saved, _shapes(abstract_state))


@contextlib.contextmanager
def _unfinished_removed_on_failure(directory: Path, read_only: bool) -> Iterator[None]:
  """A save that failed (a full disk: its threads have stopped by the time the failure reaches
  here) leaves no temporary step folder behind to keep the disk full."""
  try:
    yield
  except Exception:
    if not read_only:
      _remove_unfinished(directory)
    raise


def _remove_unfinished(directory: Path, timeout_s: float = 10.0, settle: int = 3) -> None:
  """Removes the temporary step folders of a failed save. Its first failed write ends the save,
  but its other writers go on for a moment: Orbax's threads are waited for, and the folders are
  removed until `settle` sweeps in a row (0.2 s apart) find none, as a pool thread may still
  create a file there (and fail on the folder removed under it: `cli` keeps that quiet)."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
      with contextlib.suppress(Exception):  # Orbax's threads re-raise their failure on join
        thread.join(max(0.0, deadline - time.monotonic()))
  quiet = 0
  while quiet < settle and time.monotonic() < deadline:
    unfinished = list(directory.glob("*.orbax-checkpoint-tmp*"))
    for folder in unfinished:
      shutil.rmtree(folder, ignore_errors=True)
    quiet = 0 if unfinished else quiet + 1
    time.sleep(0.2)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _name(path) -> str:
  def part(key):
    for attribute in ("key", "idx", "name"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)

  return "/".join(part(k) for k in path)


def _words(x: jax.Array) -> jax.Array:
  """An array's bits as uint32 words (16- and 8-bit elements widened, 64-bit ones split)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2] for 64-bit elements


def _fmix32(h):
  """MurmurHash3's 32-bit finalizer: a bijection in which every input bit flips each output bit
  with probability about 1/2. Of a uint32 JAX or NumPy array, in its own library."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


SEEDS = (0x9E3779B9, 0x7F4A7C15)


@jax.jit
def _digest(x: jax.Array) -> jax.Array:
  words = _words(x).ravel()
  position = jnp.arange(words.size, dtype=jnp.uint32)
  lanes = [
    jnp.sum(_fmix32(words ^ _fmix32(position + jnp.uint32(seed))), dtype=jnp.uint32)
    for seed in SEEDS
  ]
  return jnp.stack(lanes)


def _host_digest(x: np.ndarray) -> np.ndarray:
  """`_digest` in NumPy, the same two numbers (uint32 arithmetic wraps alike in both)."""
  if x.dtype == np.bool_:
    words = x.astype(np.uint32)
  elif x.dtype.itemsize == 4:
    words = x.view(np.uint32)
  else:
    words = x.view({1: np.uint8, 2: np.uint16}[x.dtype.itemsize]).astype(np.uint32)
  words = words.ravel()
  position = np.arange(words.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    lanes = [
      np.sum(_fmix32(words ^ _fmix32(position + np.uint32(seed))), dtype=np.uint32)
      for seed in SEEDS
    ]
  return np.stack(lanes)


def _on_host(x: jax.Array) -> bool:
  """Whether `x` is whole in this process's CPU memory (elements of at most 32 bits), so that
  NumPy sums it without a compiled program."""
  return (
    x.is_fully_addressable
    and {getattr(device, "platform", None) for device in x.sharding.device_set} == {"cpu"}
    and isinstance(x.dtype, np.dtype)  # not a PRNG key's extended dtype
    and x.dtype.itemsize <= 4
  )


def _digests(leaves: list[jax.Array]) -> list[jax.Array | np.ndarray]:
  # Arrays in this process's CPU memory are summed by NumPy: the compiled programs, one per
  # shape and dtype, took 1.5 s to compile at a run's first save (a 0.8M-parameter GPT's state:
  # 206 arrays of 20 shapes, 0.07 s each) against ~20 ms to sum the arrays on the host.
  # Elsewhere, one program per shape and dtype, not one over every array (that one took 2.7 s
  # to compile); each waits for the one before: programs over differently sharded arrays in
  # flight together can starve the CPU client's threads at their collectives (XLA aborts
  # after 40 s).
  return [
    _host_digest(np.asarray(x)) if _on_host(x) else jax.block_until_ready(_digest(x))
    for x in leaves
  ]


@jax.jit
def _legacy_sums(leaves: list[jax.Array]) -> list[jax.Array]:
  """The checksums of checkpoints written before format 2: a plain and a position-weighted sum
  of the words (which two sign flips or a swap of +x and -x can leave unchanged)."""
  out = []
  for x in leaves:
    words = _words(x).ravel()
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    out.append(
      jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])
    )
  return out


def checksums(state: Any, sums=_digests) -> dict[str, list[int]]:
  """{array name: its two 32-bit checksums} (see the module docstring), computed on the global
  arrays (jitted), so every process of a multi-host run gets the same numbers."""
  named = [
    (_name(path), leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    if hasattr(leaf, "dtype")
  ]
  if not named:
    return {}
  values = jax.device_get(sums([jnp.asarray(leaf) for _, leaf in named]))
  return {
    name: [int(v) for v in np.asarray(value)]
    for (name, _), value in zip(named, values, strict=True)
  }


def _json_sha256(values: Any) -> str:
  return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _verify(state: Any, data: dict[str, Any], saved: dict[str, Any]) -> None:
  if saved.get("format") == CHECKSUM_FORMAT:
    now, arrays = checksums(state), saved.get("arrays", {})
    if saved.get("data") != _json_sha256(data):
      raise ValueError("its data record (the input stream's position) differs from its checksum")
  else:  # written before format 2: the arrays' sums only
    now, arrays = checksums(state, _legacy_sums), saved
  if now.keys() != arrays.keys():
    raise ValueError("its checksums name other arrays than it holds")
  changed = sorted(name for name in now if now[name] != list(arrays[name]))
  if changed:
    raise ValueError(f"{len(changed)} arrays differ from their checksums, e.g. {changed[0]}")


def _check_finite(state: Any) -> None:
  """A checkpoint with NaN or Inf is damaged. Computed on the global arrays (one jit), so it
  also works when each process holds only its own shards."""
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  if floats and not bool(
    jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(floats)
  ):
    raise UserError("it holds non-finite values")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/decoder/embed/table/value": shape} for a state, its abstract twin or its Orbax
  metadata, whose paths differ only in key types (attribute, dict key, index)."""
  return {
    _name(path): tuple(getattr(leaf, "shape", ()))
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _describe_difference(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
  """The first name or shape of each kind that differs, in words; None when all agree."""
  params_first = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params"), k))
  only_saved = params_first(saved.keys() - wanted.keys())
  only_wanted = params_first(wanted.keys() - saved.keys())
  reshaped = params_first(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
  parts = []
  if reshaped:
    parts.append(
      f"{len(reshaped)} arrays differ in shape, e.g. {reshaped[0]} saved "
      f"{saved[reshaped[0]]}, now {wanted[reshaped[0]]}"
    )
  if only_wanted:
    parts.append(f"{len(only_wanted)} arrays are new, e.g. {only_wanted[0]}")
  if only_saved:
    parts.append(f"{len(only_saved)} saved arrays are gone, e.g. {only_saved[0]}")
  return "; ".join(parts) or None


def average_params(
  checkpointer: Checkpointer, abstract_state: Any, last: int, *, held: tuple[int, Any] = (-1, None)
):
  """The mean of the parameters of the last `last` checkpoints (the paper averages 5 or 20).

  `held` = (step, parameters) already in memory (a run's at its end): that step is not read
  again. A damaged one is left out with a warning: the average of the others still stands.
  """
  total, averaged = None, []
  for step in checkpointer.steps()[-last:]:
    if step == held[0]:
      params = held[1]
    else:
      try:
        params = checkpointer.restore(abstract_state, step)[0].params
      except CheckpointError as error:
        log.warning("averaging leaves out checkpoint step %d: %s", step, error)
        continue
    total = params if total is None else jax.tree.map(lambda a, b: a + b, total, params)
    averaged.append(step)
  if not averaged:
    raise CheckpointError(
      f"none of the last {last} checkpoints in {checkpointer.directory} is "
      "readable: set average_last_checkpoints=0 to use the final parameters"
    )
  return jax.tree.map(lambda x: x / len(averaged), total), averaged
