"""A training run from config to scores: set up (`setup.opened`), train (`train`), finish
(`finish.finish`).

`run(config, workdir)` is the whole job, as `python train.py` runs it; it resumes from the
run's newest good checkpoint when the workdir has one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from transformer import compilation_cache
from transformer.allocator import freeze_imported_objects, keep_freed_memory
from transformer.cli import Stopped, check_stopped
from transformer.config import Config, write_config
from transformer.parallel import distributed
from transformer.parallel.mesh import global_batch
from transformer.parallel.strategies import TrainStep
from transformer.runs.checkpoint import Record
from transformer.train import metrics as metrics_lib
from transformer.train import report
from transformer.train.finish import elapsed_s, evaluation, finish
from transformer.train.flops import step_flops
from transformer.train.preemption import StopRequest
from transformer.train.setup import Run, opened
from transformer.train.step import TrainState

log = logging.getLogger(__name__)


def run(config: Config | ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (or resumes) a run in `workdir`, then evaluates it; returns the final metrics.

  `config` is a `Config` or a recipe's ConfigDict (`configs/default.py`'s `get_config()`).
  """
  config = Config.of(config)
  compilation_cache.enable()
  keep_freed_memory()  # each step's temporary buffers without page faults (see allocator.py)
  freeze_imported_objects()
  distributed.initialize(config.parallel)
  if jax.process_index() != 0:  # process 0 speaks for the run; the others only warn
    logging.getLogger("transformer").setLevel(logging.WARNING)
  with opened(config, workdir) as (job, state):
    if jax.process_index() == 0:
      write_config(job.workdir, job.config)  # data.vocab_size 0 resolved to the tokenizer's
      report.append_environment(job.workdir, report.environment_record(job.mesh))
      for line in report.startup_lines(job):
        log.info(line)
    writer = metrics_lib.MetricWriter(job.workdir, enabled=jax.process_index() == 0)
    try:
      state = train(job, state, writer)
      results = finish(job, state)
      writer.write(results["step"], {k: v for k, v in results.items() if k != "step"})
    finally:
      writer.close()
  if jax.process_index() == 0:
    report.print_summary(results, job.workdir)
  return results


def save(job: Run, state: TrainState, *, force: bool = False) -> None:
  step = int(state.step)
  # Step 0 is the seed's initialisation: saving it (e.g. after a crash in the first step)
  # would only pin the workdir to a config that may need fixing.
  if step == 0 or step in job.checkpointer.steps():
    return
  record = Record(stream=job.inputs.train.state(), elapsed_s=elapsed_s(job))
  job.checkpointer.save(step, state, record, force=force)


class LeafState:
  """The train state between steps as its flat list of arrays, stepped by `step`.

  Taking an nnx.State of ~200 Variables apart and building it again is Python work on every
  call of the jitted step: 1.7 ms of a ~50 ms step (a 0.8M-parameter GPT on one core, the
  calls timed in turns in one process). The step runs on the leaves instead, and the loop
  builds the state only where it reads it (`state`: reports, evaluations, checkpoints).
  """

  def __init__(self, state: TrainState, train_step: TrainStep):
    self.treedef = jax.tree.structure(state)
    self.leaves = jax.tree.leaves(state)
    self.key = train_step.key

    def on_leaves(leaves, batch, key):
      new, metrics = train_step.jitted(jax.tree.unflatten(self.treedef, leaves), batch, key)
      return jax.tree.leaves(new), metrics

    self._step = jax.jit(on_leaves, donate_argnums=0)

  def step(self, batch) -> dict[str, jax.Array]:
    """One update; returns its metrics (the old leaves are donated)."""
    self.leaves, metrics = self._step(self.leaves, batch, self.key)
    return metrics

  @property
  def state(self) -> TrainState:
    return jax.tree.unflatten(self.treedef, self.leaves)


def train(job: Run, state: TrainState, writer: metrics_lib.MetricWriter) -> TrainState:
  """Runs updates until num_train_steps; returns the last state. The step counter lives on the
  host to avoid syncs. A signal stops the loop after the same step on every process
  (`StopRequest`); that step is saved, then `Stopped` is raised."""
  config = job.config
  step = int(state.step)
  check_stopped()  # a signal during the set-up whose raise Python dropped: nothing trained yet
  stop = StopRequest()
  progress = metrics_lib.Progress(step, config.num_train_steps, enabled=jax.process_index() == 0)
  window = report.StepWindow()
  profiler = report.Profiler(job.workdir, config.profile_steps)
  pending: list[
    dict[str, jax.Array]
  ] = []  # step metrics, summed at log steps (metrics_lib.host_sums)
  first = True
  leaves = LeafState(state, job.train_step)
  try:
    with jax.set_mesh(job.mesh):
      while step < config.num_train_steps and not stop.stop_now(step):
        profiler.before(step + 1)
        asked = time.perf_counter()
        batch = next(job.inputs.train)
        waited = time.perf_counter() - asked
        step_metrics = leaves.step(global_batch(batch, job.mesh))
        step += 1
        if first:  # compilation is not a step: the first window starts after it
          report.first_step_done(leaves.leaves, batch_at=asked + waited)
          window.reset()
          first = False
        else:
          tokens = int(np.sum(batch["targets"] != 0)) * jax.process_count()
          flops = step_flops(config.task, config.model, batch) * jax.process_count()
          window.add(tokens, flops, waited)
        profiler.after(step, leaves.leaves)
        pending.append(step_metrics)
        progress.update(1)
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
          shown = report.log_window(
            job, leaves.state, writer, window, metrics_lib.host_sums(pending), step
          )
          progress.set_postfix(**shown)
          pending = []
        if step % config.eval_every_steps == 0 and step < config.num_train_steps:
          evaluating = time.perf_counter()
          writer.write(step, evaluation(job, leaves.state.params))
          window.exclude(time.perf_counter() - evaluating)
        if step % config.checkpoint_every_steps == 0:
          save(job, leaves.state)
  finally:
    profiler.stop()
    progress.close()
    try:
      save(job, leaves.state, force=True)
      job.checkpointer.wait()
    finally:  # a second signal while saving only repeats the request: the save completes
      stop.restore()
  if stop.reason:
    saved = job.checkpointer.steps()
    raise Stopped(
      f"{stop.reason} at step {step}; "
      + (
        f"checkpoint {saved[-1]} is saved, run the same command to resume"
        if saved
        else "nothing was trained yet, so nothing was saved"
      )
    )
  return leaves.state
