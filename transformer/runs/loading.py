"""Loading a trained run for use: its exported model by default, or a checkpoint, or an average.

Every path ends in the same strict check (`load_strict`): the parameters must be exactly the
model's, so a model is never used with some of its parameters left random.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from transformer.config import CONFIG_FILENAME, read_config
from transformer.data.tokenizer import Tokenizer, tokenizer_file
from transformer.errors import MissingFile, UserError
from transformer.model.transformer import create_model
from transformer.runs.artifact import MODEL_DIRNAME, check_sizes, read_model
from transformer.runs.checkpoint import Checkpointer, CheckpointError, check_tokenizer
from transformer.runs.params import FlatParams, load_strict, state_params
from transformer.runs.spec import RunSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedRun:
  """A run's model ready for use, its tokenizer, and where its parameters came from."""

  spec: RunSpec
  tokenizer: Tokenizer
  model: nnx.Module
  source: str  # "model" (the export), "checkpoint 900", "average of checkpoints [...]"
  steps: list[int] = dataclasses.field(default_factory=list)  # the checkpoints it was made of


def checkpoints_of(workdir: Path) -> Checkpointer:
  directory = Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise MissingFile(f"no checkpoint in {directory}: train the run first")
  # Read-only: another process may be training in it (its unfinished saves are left alone).
  return Checkpointer(directory, read_only=True)


def checkpoint_params(workdir: Path, step: int | None = None) -> tuple[FlatParams, int]:
  """The parameters of checkpoint `step` (default: the newest readable one), as saved; refused
  if the workdir's tokenizer is not the one it was trained with."""
  checkpointer = checkpoints_of(workdir)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise MissingFile(f"no checkpoint in {checkpointer.directory}: train the run first")
    if step is not None and step not in steps:
      raise UserError(
        f"--step {step}: {checkpointer.directory} has checkpoints "
        f"{', '.join(map(str, steps))}; pick one of them"
      )
    state, record, step = checkpointer.restore_saved(step)
    check_tokenizer(record, step, tokenizer_file(workdir))
    return state_params(state["params"]), step
  finally:
    checkpointer.close()


def averaged_checkpoint_params(workdir: Path, last: int) -> tuple[FlatParams, list[int]]:
  """The mean of the parameters of the newest `last` checkpoints (Section 6.1); a damaged one is
  left out with a warning, as training's own average does. One trained with another tokenizer
  than the workdir's is no damage: it refuses the whole average."""
  checkpointer = checkpoints_of(workdir)
  try:
    steps = checkpointer.steps()
    if last < 1 or last > len(steps):
      raise UserError(
        f"--average {last}: {checkpointer.directory} holds {len(steps)} "
        f"checkpoints ({', '.join(map(str, steps)) or 'none'}); average 1 to "
        f"{len(steps)} of them"
      )
    total: FlatParams = {}
    averaged = []
    for step in steps[-last:]:
      try:
        state, record, _ = checkpointer.restore_saved(step)
      except CheckpointError as error:
        log.warning("averaging leaves out checkpoint step %d: %s", step, error)
        continue
      check_tokenizer(record, step, tokenizer_file(workdir))
      for name, value in state_params(state["params"]).items():
        total[name] = total.get(name, 0) + np.asarray(value, np.float64)
      averaged.append(step)
    if not averaged:
      raise CheckpointError(
        f"none of the newest {last} checkpoints in {checkpointer.directory} "
        "is readable: use the exported model (no --average), or train again"
      )
    return {k: (v / len(averaged)).astype(np.float32) for k, v in total.items()}, averaged
  finally:
    checkpointer.close()


def load_run(
  workdir: str | Path, *, step: int | None = None, average: int | None = None
) -> LoadedRun:
  """The run's model: WORKDIR/model (the export), or checkpoint `step`, or the average of the
  newest `average` checkpoints; in eval mode."""
  if not str(workdir).strip():
    raise UserError("--workdir is empty: give the run directory that training wrote")
  workdir = Path(workdir).absolute()
  if not workdir.is_dir():
    raise MissingFile(
      f"{workdir} is not a directory: --workdir must be a run directory written by training"
    )
  if step is not None and average is not None:
    raise UserError("--step and --average each pick the parameters: give one of them")
  if step is None and average is None:
    spec, params, tokenizer_path, _ = read_model(workdir)
    source, steps = str(workdir / MODEL_DIRNAME), list[int]()
  else:
    spec, tokenizer_path = RunSpec.of(read_config(workdir)), tokenizer_file(workdir)
    if average is not None:
      params, steps = averaged_checkpoint_params(workdir, average)
      source = f"the average of checkpoints {steps} of {workdir}"
    else:
      params, saved = checkpoint_params(workdir, step)
      source, steps = f"checkpoint {saved} of {workdir}", [saved]
  if step is not None or average is not None:  # sizes from config.json, bounded as model.json's
    header = {name: (tuple(np.shape(value)), "F32") for name, value in params.items()}
    check_sizes(spec, header, workdir / "checkpoints", workdir / CONFIG_FILENAME)
  if not tokenizer_path.is_file():
    raise MissingFile(f"{tokenizer_path} is missing: the run has no tokenizer")
  tokenizer = Tokenizer(tokenizer_path)
  if tokenizer.vocab_size != spec.model.vocab_size:
    raise UserError(
      f"{tokenizer_path} has {tokenizer.vocab_size} pieces but the model was "
      f"trained with {spec.model.vocab_size}: the tokenizer is not this run's"
    )
  # Unrolled whatever the run trained with: decoding and inspection run layer by layer, and
  # load_strict converts stacked checkpoints (model.scan_layers) to per-layer parameters.
  model = create_model(spec.task, spec.model.replace(scan_layers=False), seed=0)
  load_strict(model, params, source)
  model.eval()
  return LoadedRun(spec, tokenizer, model, source, steps)


def warm_start_params(workdir: str | Path) -> tuple[FlatParams, Path, str]:
  """(parameters, tokenizer file, where from) that `init_from` starts a run from: the run's
  exported model, or its newest checkpoint when it has none (a run stopped before its end)."""
  workdir = Path(workdir)
  if (workdir / MODEL_DIRNAME).is_dir():
    _, params, tokenizer_path, _ = read_model(workdir)
    return params, tokenizer_path, str(workdir / MODEL_DIRNAME)
  try:
    params, step = checkpoint_params(workdir)
  except (FileNotFoundError, CheckpointError) as error:
    raise MissingFile(f"init_from: {error}") from None
  return params, tokenizer_file(workdir), f"checkpoint {step} of {workdir}"


def host_params(params) -> FlatParams:
  """Global (possibly sharded, multi-process) parameter arrays as full host arrays, by name."""
  from jax.experimental import multihost_utils

  flat = (
    state_params(params)
    if not isinstance(params, nnx.State)
    else {
      "/".join(str(k) for k in path): leaf.get_value() if hasattr(leaf, "get_value") else leaf
      for path, leaf in nnx.to_flat_state(params)
    }
  )
  return {
    name: np.asarray(multihost_utils.process_allgather(value, tiled=True))
    if isinstance(value, jax.Array)
    else np.asarray(value)
    for name, value in flat.items()
  }
