"""A training run set up from its config: mesh, inputs, sharded state, compiled steps, checkpoints.

`opened(config, workdir)` yields `(run, state)`: `run` a frozen record of everything that stays
fixed while training (`Run`), `state` the train state to start from (fresh, warm-started from
another run, or restored from this run's newest good checkpoint). Leaving the `with` waits for
the last checkpoint, stops the checkpointer's and the stream's threads and releases the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from transformer.config import CONFIG_FILENAME, Config, read_config
from transformer.data.corpus import Corpus, Location
from transformer.data.inputs import Inputs, Share, ensure_tokenizer, training_inputs
from transformer.data.tokenizer import Tokenizer, tokenizer_file
from transformer.errors import UserError
from transformer.model.layers import position_table_bytes
from transformer.model.transformer import create_model
from transformer.parallel import distributed
from transformer.parallel.axes import FSDP, TENSOR
from transformer.parallel.mesh import (
  batch_sharding,
  check_divisible,
  data_ways,
  make_mesh,
  replicated,
)
from transformer.parallel.sharding import abstract_with_shardings, shard
from transformer.parallel.strategies import TrainStep, compile_train_step
from transformer.runs.checkpoint import Checkpointer, Record, check_tokenizer, is_step_name
from transformer.runs.loading import warm_start_params
from transformer.runs.lock import WorkdirLock
from transformer.runs.params import load_matching
from transformer.train import report
from transformer.train.flops import available_memory_bytes, parameter_count
from transformer.train.optimizer import learning_rate, make_optimizer
from transformer.train.step import TrainState, make_steps

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Run:
  """What a training run holds fixed: built once by `opened`, read by the loop and the finish.

  Attributes:
    config, workdir: what the run is and where it writes.
    mesh: the devices and their axes.
    inputs: tokenizer, training stream, validation and test sets.
    graphdef, rest: the model's structure and its non-parameter state (dropout RNG streams);
      `model(params)` merges them with parameters.
    state_shardings: the train state's layout on the mesh.
    train_step, eval_step: the compiled steps.
    schedule: the learning rate at each update.
    checkpointer: this run's checkpoints.
    parameters: the model's parameter count.
    peak: (FLOP/s, how it was found), the MFU reference; (None, "") off process 0.
    resumed_from: the checkpoint this start continues, or None.
    elapsed_before: seconds the run had spent before this start (0 for a new run).
  """

  config: Config
  workdir: Path
  mesh: Mesh
  inputs: Inputs
  graphdef: nnx.GraphDef
  rest: nnx.State
  state_shardings: Any
  train_step: TrainStep
  eval_step: Callable
  schedule: optax.Schedule
  checkpointer: Checkpointer
  parameters: int
  peak: tuple[float | None, str]
  resumed_from: int | None
  elapsed_before: float

  def model(self, params: nnx.State) -> nnx.Module:
    """The model with `params`, in eval mode (no dropout)."""
    model = nnx.merge(self.graphdef, params, self.rest)
    model.eval()
    return model

  def abstract_state(self, state: TrainState) -> TrainState:
    """ShapeDtypeStructs of `state` with the run's shardings: a restore target."""
    return abstract_with_shardings(self.state_shardings, state)


@contextlib.contextmanager
def opened(config: Config, workdir: str | Path) -> Iterator[tuple[Run, TrainState]]:
  """Sets up the run in `workdir` (see the module docstring); yields (run, state to start from)."""
  if not str(workdir).strip():  # Path("") would be the current folder
    raise UserError("--workdir is empty: name the run's directory, e.g. --workdir runs/exp1")
  workdir = Path(workdir)
  with contextlib.ExitStack() as stack:
    # Threads of a half-built run (checkpointing, prefetching) would fail noisily at exit.
    workdir.mkdir(parents=True, exist_ok=True)
    # One writer per workdir; process 0 holds the lock for the whole job.
    distributed.on_first_process(
      lambda: stack.callback(WorkdirLock(workdir, "training").release),
      "taking-the-workdir-lock",
      timeout_s=config.parallel.barrier_timeout_s,
    )
    mesh = make_mesh(config.parallel)
    where = Location.of(config.data, workdir, jax.process_count())
    if config.data.vocab_size == 0:  # the char or byte tokenizer's own size, the one place
      config = config.with_vocab_size(_tokenizer_size(config, where))
    check_resumable(config, workdir)
    # Before any data work, so a mesh that cannot split the model or the evaluation batches
    # fails in seconds. The tokenizer has exactly data.vocab_size pieces.
    check_divisible(
      mesh,
      num_heads=config.model.num_heads,
      d_ff=config.model.d_ff,
      d_model=config.model.d_model,
      vocab_size=config.model.vocab_size,
      batch_size=config.data.eval_batch_size,
    )
    parameters = check_memory(config, mesh)
    inputs = _inputs(config, where, mesh)
    stack.callback(inputs.train.close)
    model = create_model(config.task, config.model, config.seed)
    if config.init_from:
      warm_start(model, config.init_from, inputs.tokenizer.model_path)
    tx = make_optimizer(
      config.optimizer, d_model=config.model.d_model, num_train_steps=config.num_train_steps
    )
    state, state_shardings = shard(initial_state(model, tx), mesh)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    steps = make_steps(
      graphdef,
      rest,
      tx,
      task=config.task,
      label_smoothing=config.label_smoothing,
      dropout_key=jax.random.key(config.seed + 1),
      grad_accum_steps=config.optimizer.grad_accum_steps,
      flat_optimizer=config.optimizer.flat_state,  # refused with sharded parameters (config)
    )
    checkpointer = Checkpointer(
      workdir / "checkpoints", keep=config.keep_checkpoints, inputs=inputs.made_of
    )
    stack.callback(checkpointer.close)
    state, resumed_from, elapsed_before = _restore(
      checkpointer, abstract_with_shardings(state_shardings, state), inputs, state, config, workdir
    )
    run = Run(
      config=config,
      workdir=workdir,
      mesh=mesh,
      inputs=inputs,
      graphdef=graphdef,
      rest=rest,
      state_shardings=state_shardings,
      train_step=compile_train_step(config.parallel.strategy, steps, state_shardings, mesh),
      eval_step=jax.jit(
        steps.eval_step,
        in_shardings=(state_shardings.params, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
      ),
      # One compiled program for the rate the reports show, not a dozen small ones run op by op.
      schedule=jax.jit(
        learning_rate(
          config.optimizer, d_model=config.model.d_model, num_train_steps=config.num_train_steps
        )
      ),
      checkpointer=checkpointer,
      parameters=parameters,
      # Process 0 reports for the run, MFU included.
      peak=report.peak_flop_per_s(
        config.model.dtype, where.cache_dir, remeasure=config.measure_peak
      )
      if jax.process_index() == 0
      else (None, ""),
      resumed_from=resumed_from,
      elapsed_before=elapsed_before,
    )
    yield run, state


def _tokenizer_size(config: Config, where: Location) -> int:
  """The vocabulary size of the run's char or byte tokenizer (data.vocab_size 0), made first by
  process 0 if the workdir has none yet."""
  data = config.data
  distributed.on_first_process(
    lambda: ensure_tokenizer(
      data, Corpus.of(data, where.cache_dir), where.workdir, where.cache_dir
    ),
    "preparing-the-tokenizer",
    timeout_s=config.parallel.barrier_timeout_s,
  )
  size = Tokenizer(tokenizer_file(where.workdir)).vocab_size
  log.info("data.vocab_size: the %s tokenizer's own, %d ids", data.tokenizer_type, size)
  return size


def _inputs(config: Config, where: Location, mesh: Mesh) -> Inputs:
  """The run's inputs; process 0 prepares the tokenizer and the token caches while the others
  wait, then every process opens them. One training batch is one update: k micro-batches of
  data.tokens_per_batch each, whose rows the step splits."""
  k = config.optimizer.grad_accum_steps
  return training_inputs(
    config.data,
    where,
    task=config.task,
    seed=config.seed,
    batch_tokens=config.data.tokens_per_batch * k,
    batch_multiple=data_ways(mesh) * k,
    share=Share(jax.process_index(), jax.process_count()),
    first_process=lambda job: distributed.on_first_process(
      job, "preparing-the-data", timeout_s=config.parallel.barrier_timeout_s
    ),
  )


def check_memory(config: Config, mesh: Mesh) -> int:
  """Refuses, before anything is allocated, a model whose parameters, gradients and Adam state
  alone exceed the memory of the devices they are spread over (activations come on top);
  returns the parameter count."""
  count = parameter_count(config.task, config.model)
  bytes_per_parameter = jnp.dtype(config.model.param_dtype).itemsize * 2 + 8  # + Adam's m, v
  shards = mesh.shape[FSDP] * mesh.shape[TENSOR]
  per_device = count * bytes_per_parameter / shards
  available = available_memory_bytes()
  if jax.local_devices()[0].platform == "cpu":  # the virtual CPU devices share the host's memory
    per_device *= jax.local_device_count()
  if available is not None and per_device > available:
    raise UserError(
      f"the model has {count / 1e6:,.0f}M parameters, whose weights, gradients and Adam state "
      f"need {per_device / 1e9:,.1f} GB on each device, more than the {available / 1e9:,.1f} GB "
      "available: shrink it (model.d_model, model.d_ff, the layers, data.vocab_size) or shard it "
      "over more devices (parallel.fsdp)"
    )
  # Evaluation batches are padded to their full size even when a split is smaller: their ids
  # and one search step's scores (beam x vocabulary) for every row.
  per_row = config.data.max_len * 4 * 2 + config.decode.beam_size * config.model.vocab_size * 8
  batch = config.data.eval_batch_size * per_row
  if available is not None and batch > available:
    raise UserError(
      f"data.eval_batch_size={config.data.eval_batch_size} needs {batch / 1e9:,.0f} GB for one "
      f"evaluation batch, more than the {available / 1e9:,.1f} GB available: lower it"
    )
  # The sinusoidal table is no parameter, but every trace of the model builds it on the host.
  table = position_table_bytes(config.model)
  host = available if jax.local_devices()[0].platform == "cpu" else _host_memory_bytes()
  if host is not None and table > host:
    raise UserError(
      f"model.max_len={config.model.max_len} needs a sinusoidal position table of "
      f"{table / 1e9:,.1f} GB while the model is built, more than the {host / 1e9:,.1f} GB "
      "available: lower model.max_len to the longest sequence the run needs"
    )
  return count


def _host_memory_bytes() -> int | None:
  try:
    for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError):
    pass
  return None


def check_resumable(config: Config, workdir: Path) -> None:
  """Refuses to resume a run under a config that changes its model or its data plan: the
  checkpoint's parameters would be read as another model, or its stream position against
  other batches. `allow_config_change` names the keys a user changes on purpose."""
  checkpoints = workdir / "checkpoints"
  if checkpoints.exists() and not checkpoints.is_dir():
    # Orbax would find out at the first save, after the first steps were trained, in a thread.
    raise UserError(
      f"{checkpoints} is not a folder: training keeps the run's checkpoints there; move it "
      "away, or use a new --workdir"
    )
  if not (checkpoints.is_dir() and any(is_step_name(p.name) for p in checkpoints.iterdir())):
    return
  if not (workdir / CONFIG_FILENAME).is_file():
    # Without the record of what the checkpoints are, any config would be taken for theirs.
    if "all" in config.allow_config_change:
      return
    raise UserError(
      f"{workdir} has checkpoints but no {CONFIG_FILENAME}, the record of the config they were "
      f"trained with: restore it, use a new --workdir, or resume under this config on purpose "
      "with --config.allow_config_change=all"
    )
  changed = config_changes(read_config(workdir), config)
  refused = [k for k in changed if not _allowed(k, config)]
  if refused:
    before, after = changed[refused[0]]
    raise UserError(
      f"{workdir} was trained with {refused[0]}={before!r}, this command sets {after!r}"
      f"{f' (and {len(refused) - 1} more)' if len(refused) > 1 else ''}: resuming would misread "
      "its checkpoints; use a new --workdir, or allow the change with "
      f"--config.allow_config_change={refused[0]}"
    )


def _allowed(key: str, config: Config) -> bool:
  """Whether allow_config_change lets a resumed run change `key` (itself, a block above it, or
  "all")."""
  return any(a == "all" or key == a or key.startswith(a + ".") for a in config.allow_config_change)


# What a resumed run may change freely: how long it runs; how it logs, evaluates, saves,
# reports, searches and spreads over devices; the optimizer's rates; dropout. Any other key
# alters the model, the optimizer state's layout or the data plan.
RESUMABLE_KEYS = (
  "num_train_steps",
  "log_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "average_last_checkpoints",
  "init_from",
  "nan_policy",
  "profile_steps",
  "measure_peak",
  "allow_config_change",
  "label_smoothing",
  "decode",
  "parallel",
  "optimizer.b1",
  "optimizer.b2",
  "optimizer.eps",
  "optimizer.weight_decay",
  "optimizer.schedule",
  "optimizer.warmup_steps",
  "optimizer.lr_scale",
  "optimizer.peak_learning_rate",
  "optimizer.end_learning_rate",
  "optimizer.grad_clip_norm",
  "data.cache_dir",
  "data.tfds_data_dir",
  "data.eval_split",
  "data.eval_batch_size",
  "data.test_splits",
  "data.eval_files",
  "data.test_files",
  "model.attention",
  "model.attention_block_size",
  "model.dropout_rate",
  "model.attention_dropout_rate",
)


def config_changes(before: Config, after: Config) -> dict[str, tuple[Any, Any]]:
  """{key: (old, new)} for every value that differs, outside `RESUMABLE_KEYS`."""
  old, new = _flat(before.to_dict()), _flat(after.to_dict())
  free = lambda key: any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)
  return {
    k: (old.get(k), new.get(k))
    for k in sorted(old.keys() | new.keys())
    if not free(k) and old.get(k) != new.get(k)
  }


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value))  # tuples as lists, as in the file
  return out


def initial_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
  """Step 0: the model's parameters and the optimizer's fresh state, on the host."""
  params = nnx.state(model, nnx.Param)
  # One program for the optimizer's zeros, not one per shape run op by op (0.2 s of compiling).
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params)
  )


def warm_start(model: nnx.Module, run: str, tokenizer_path: Path) -> None:
  """Starts from another run's parameters (its exported model, else its newest checkpoint):
  every parameter whose name and shape match; a new head keeps its fresh initialisation."""
  params, their_tokenizer, source = warm_start_params(run)
  if Path(their_tokenizer).read_bytes() != Path(tokenizer_path).read_bytes():
    raise UserError(
      f"init_from {run}: its tokenizer ({their_tokenizer}) is not this run's "
      f"({tokenizer_path}), so its embeddings would mean other pieces: train this run with that "
      "run's tokenizer (copy its spm.model or vocab.json into the workdir first) or start afresh"
    )
  copied, fresh = load_matching(model, params)
  if not copied:
    raise UserError(
      f"init_from {run}: no parameter matches this model's names and shapes; "
      "check that both runs use the same model sizes"
    )
  log.info(
    "init_from %s: %d parameters copied, %d initialised fresh%s",
    source,
    copied,
    len(fresh),
    f" ({', '.join(fresh[:5])}...)" if fresh else "",
  )


def _restore(
  checkpointer: Checkpointer,
  abstract: TrainState,
  inputs: Inputs,
  fresh: TrainState,
  config: Config,
  workdir: Path,
) -> tuple[TrainState, int | None, float]:
  """(state, the step resumed from, the seconds the run had spent): the newest good checkpoint
  with the stream moved to where it stopped, or the fresh state. Refused when the tokenizer or
  the training text is not the one the checkpoint was trained with."""
  checkpointer.check_resumable()
  if not checkpointer.steps():
    return fresh, None, 0.0
  state, record, step = checkpointer.restore(abstract)
  if step > config.num_train_steps:
    # Nothing would be trained, and config.json would record fewer steps than the model had.
    raise UserError(
      f"{workdir} is at checkpoint step {step}, past num_train_steps={config.num_train_steps}: "
      f"set --config.num_train_steps={step} or more to finish or continue it, or use a new "
      "--workdir to train a shorter run"
    )
  check_tokenizer(record, step, inputs.tokenizer.model_path)
  if _same_text(record, step, inputs, config):
    inputs.train.restore(record.stream)
  elapsed = record.elapsed_s
  if elapsed is None:  # a checkpoint written before the elapsed time was kept in it
    elapsed = report.elapsed_at(workdir, step)
  log.info("resumed from step %d in %s", step, checkpointer.directory)
  return state, step, elapsed


def _same_text(record: Record, step: int, inputs: Inputs, config: Config) -> bool:
  """Whether the training text is the one checkpoint `step` read (or either is unrecorded).

  The stream's position (epoch, chunk, batch) counts batches of that text's plan: against other
  text it would silently point at other batches, while the config, naming the same files, shows
  no change. Other text is refused unless allowed on purpose; the stream then starts at the new
  text's first batch."""
  saved = (record.inputs or {}).get("train_text")
  now = inputs.made_of.get("train_text")
  if saved is None or now is None or saved == now:
    return True
  key = "data.train_files" if config.data.from_files else "data.source_dir"
  value = getattr(config.data, key.removeprefix("data."))
  if not _allowed(key, config):
    raise UserError(
      f"the training text of {key}={value!r} has changed since checkpoint step {step} was "
      "trained on it, so the saved stream position would point into other batches: restore "
      "those files, use a new --workdir, or continue on the new text from its first batch with "
      f"--config.allow_config_change={key}"
    )
  log.warning(
    "the training text of %s has changed since checkpoint step %d (allowed by "
    "allow_config_change): the stream starts at the new text's first batch",
    key,
    step,
  )
  return False
