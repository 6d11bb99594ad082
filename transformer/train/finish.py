"""What a run does with parameters besides training them: evaluate, average, export, score.

`score` is the one way a run's model is translated and scored, for the validation split's greedy
BLEU at every evaluation and for the test sets at the end. `finish` ends a run: the parameters
it ships (the average of its last checkpoints, or its last ones), exported as WORKDIR/model,
evaluated and scored with the run's own search settings, the scores kept in model.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import files
from transformer.cli import check_stopped
from transformer.data.inputs import TestSet
from transformer.decode.config import DecodeConfig
from transformer.decode.scoring import prepare_search, score_test_sets, write_report
from transformer.parallel.mesh import global_batch
from transformer.runs.artifact import export_model, record_scores
from transformer.runs.checkpoint import average_params
from transformer.runs.loading import host_params
from transformer.runs.spec import RunSpec
from transformer.train import metrics as metrics_lib
from transformer.train.loss import summarize
from transformer.train.setup import Run
from transformer.train.step import TrainState

log = logging.getLogger(__name__)


def score(
  run: Run,
  params: nnx.State,
  sets: Sequence[TestSet],
  decode: DecodeConfig,
  out_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
  """Translates `sets` with the model of `params` and scores them (see `score_test_sets`)."""
  return score_test_sets(run.model(params), sets, run.inputs.tokenizer, decode, run.mesh, out_dir)


def compile_test_search(run: Run, params: nnx.State) -> threading.Thread | None:
  """Starts compiling the test sets' beam search in a thread, where `finish` will score them:
  compiling takes one core for about 20 s, which the averaging, the export and the validation
  leave mostly free. None where there is nothing to compile, or several processes (their
  programs run in step across hosts)."""
  config = run.config
  if not (
    config.task == "translation"
    and config.decode.bleu_at_end
    and run.inputs.test_sets
    and jax.process_count() == 1
  ):
    return None

  def compile_it() -> None:
    try:
      prepare_search(run.model(params), run.inputs.test_sets, config.decode, run.mesh)
    except Exception as error:  # the search compiles when it runs instead
      log.debug("compiling the test sets' search ahead failed: %s", error)

  # Not a daemon: a daemon thread still compiling when a signal ends the command is cut off
  # inside XLA at the interpreter's exit, which aborts the process (exit 134, "FATAL:
  # exception not rethrown"); the exit waits for the compile instead.
  thread = threading.Thread(target=compile_it, name="compile-test-search")
  thread.start()
  return thread


def elapsed_s(run: Run) -> float:
  """Seconds the run has taken so far, across every start of it."""
  return run.elapsed_before + metrics_lib.process_age_s()


def evaluation(run: Run, params: nnx.State) -> dict[str, float]:
  """Validation loss, perplexity and accuracy, the validation split's greedy BLEU (translation,
  decode.validation_bleu), and how long the run has taken so far: one point of its curves."""
  totals = None
  with jax.set_mesh(run.mesh):
    for batch in run.inputs.eval_batches:
      sums = run.eval_step(params, global_batch(batch, run.mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  scalars = {f"eval/{k}": v for k, v in summarize(jax.device_get(totals)).items()}
  config, validation = run.config, run.inputs.validation
  if config.task == "translation" and config.decode.validation_bleu and validation is not None:
    greedy = dataclasses.replace(config.decode, beam_size=1, num_examples=0)
    scalars["eval/bleu_greedy"] = score(run, params, [validation], greedy)[validation.name]["bleu"]
  scalars["time/elapsed_s"] = elapsed_s(run)
  return scalars


def final_params(run: Run, state: TrainState) -> tuple[nnx.State, list[int]]:
  """(parameters, the checkpoints they average): the mean of the last checkpoints'
  (Section 6.1) with average_last_checkpoints > 1, else the current ones ([])."""
  k = run.config.average_last_checkpoints
  if k <= 1 or len(run.checkpointer.steps()) < 2:
    return state.params, []
  held = (int(state.step), state.params)  # the newest checkpoint's, if it is this step's
  params, steps = average_params(run.checkpointer, run.abstract_state(state), k, held=held)
  log.info("averaged the parameters of checkpoints %s", steps)
  return params, steps


def export(run: Run, step: int, params: nnx.State, averaged_steps: list[int]) -> None:
  """Writes `params` as the run's model (WORKDIR/model, see `transformer.runs.artifact`);
  every process takes part in gathering them, process 0 writes."""
  flat = host_params(params)
  if jax.process_index() == 0:
    info = {"step": step, "averaged_steps": averaged_steps}
    path = export_model(
      run.workdir, RunSpec.of(run.config), flat, run.inputs.tokenizer.model_path, info
    )
    log.info("model written to %s", path)


def finish(run: Run, state: TrainState) -> dict[str, Any]:
  """Exports the run's final parameters, evaluates and scores them; returns the results (also
  written to results.json, bleu.json and model.json's scores)."""
  compiling = compile_test_search(run, state.params)
  params, averaged_steps = final_params(run, state)
  step = int(state.step)
  check_stopped()  # a signal whose raise JAX's finalizers swallowed stops here, not at the end
  export(run, step, params, averaged_steps)  # the model scored below is the model one uses
  check_stopped()
  results: dict[str, Any] = {"step": step, **evaluation(run, params)}
  config, workdir = run.config, run.workdir
  scores: dict[str, Any] = {}
  if compiling is not None:
    compiling.join()
  check_stopped()
  if config.task == "translation" and config.decode.bleu_at_end and run.inputs.test_sets:
    scores = score(run, params, run.inputs.test_sets, config.decode, workdir / "translations")
    check_stopped()
    write_report(scores, workdir / "bleu.json")
    results.update({f"bleu/{split}": r["bleu"] for split, r in scores.items()})
  if jax.process_index() == 0:
    kept = ("bleu", "bleu_lowercased", "chrf", "signature", "beam_size", "alpha")
    record_scores(
      workdir,
      {
        "validation": {k.removeprefix("eval/"): v for k, v in results.items() if "eval/" in k},
        **{name: {k: r[k] for k in kept} for name, r in scores.items()},
      },
    )
    files.write_text(workdir / "results.json", json.dumps(results, indent=2))
  return results
