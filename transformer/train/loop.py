"""The training loop: config -> data -> sharded state -> jitted steps -> checkpoints -> BLEU."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from transformer.data.inputs import Inputs, build_inputs
from transformer.parallel import distributed
from transformer.parallel.mesh import (batch_sharding, check_divisible, global_batch,
                                       logical_shardings, make_mesh, put_global, replicated)
from transformer.parallel.axes import DATA, FSDP
from transformer.parallel.strategies import compile_train_step
from transformer.train import metrics as metrics_lib
from transformer.train.checkpoint import Checkpointer, average_params
from transformer.train.config import model_config, validate
from transformer.train.loss import summarize
from transformer.train.models import create_model, load_params_into
from transformer.train.optimizer import learning_rate, make_optimizer
from transformer.train.step import TrainState, make_steps

log = logging.getLogger(__name__)


class StopRequested:
  """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint and exit cleanly."""

  def __init__(self):
    self.signal = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def sharded_state(model, tx, mesh):
  """The train state of `model`, placed on the mesh by its parameters' logical axis names."""
  params = nnx.state(model, nnx.Param)
  host_state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  shardings = logical_shardings(host_state, mesh)
  return put_global(host_state, shardings), shardings


def abstract_with_shardings(state_shardings, state):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, state_shardings)


def update_stream_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config the training stream reads: one batch per update.

  With optimizer.grad_accum_steps = k, that batch holds k x data.tokens_per_batch tokens from one
  length bucket, in rows a multiple of k x the data-parallel ways (see `build_inputs`), and
  `micro_batches` cuts it into k micro-batches with exactly the rows and length of a batch
  without accumulation. One bucket per update keeps the stack one shape without padding it to
  the largest of k buckets, and the stream's position still counts updates, so resuming is exact.
  """
  stream = config.copy_and_resolve_references()
  stream.data.tokens_per_batch = config.data.tokens_per_batch * config.optimizer.grad_accum_steps
  return stream


def micro_batches(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
  """[k * B, ...] -> [k, B, ...]: an update's rows as k micro-batches of consecutive rows."""
  return {key: value.reshape(k, -1, *value.shape[1:]) for key, value in batch.items()}


class Trainer:
  """Owns a run's mesh, state, compiled steps and checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
    validate(config)
    self.config, self.workdir = config, Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.mesh = make_mesh(config.parallel)
    # Before any data work, so a mesh that cannot split the model or the evaluation batches
    # fails in seconds. The tokenizer has exactly data.vocab_size pieces (checked again below).
    check_divisible(self.mesh, num_heads=config.model.num_heads, d_ff=config.model.d_ff,
                    d_model=config.model.d_model, vocab_size=config.data.vocab_size,
                    batch_size=config.data.eval_batch_size)
    data_ways = self.mesh.shape[DATA] * self.mesh.shape[FSDP]
    self.grad_accum_steps = config.optimizer.grad_accum_steps
    self.inputs: Inputs = build_inputs(update_stream_config(config), self.workdir,
                                       batch_multiple=data_ways * self.grad_accum_steps,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
    with config.unlocked():
      config.model.vocab_size = self.inputs.tokenizer.vocab_size
    self.model_config = model_config(config)
    check_divisible(self.mesh, num_heads=self.model_config.num_heads,
                    d_ff=self.model_config.d_ff, d_model=self.model_config.d_model,
                    vocab_size=self.model_config.vocab_size)
    self.model = create_model(config.task, self.model_config, config.seed)
    if config.init_from:
      load_params_into(self.model, config.init_from)
    self.tx = make_optimizer(config)
    self.state, self.state_shardings = sharded_state(self.model, self.tx, self.mesh)
    self.graphdef, _, self.rest = nnx.split(self.model, nnx.Param, ...)
    steps = make_steps(self.graphdef, self.rest, self.tx, task=config.task,
                       label_smoothing=config.label_smoothing,
                       dropout_key=jax.random.key(config.seed + 1),
                       grad_accum_steps=self.grad_accum_steps)
    self.train_step = compile_train_step(config.parallel.strategy, steps, self.state_shardings,
                                         self.mesh)
    self.eval_step = jax.jit(steps.eval_step,
                             in_shardings=(self.state_shardings.params, batch_sharding(self.mesh)),
                             out_shardings=replicated(self.mesh))
    self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=config.keep_checkpoints)
    try:
      self.resumed_from = self._restore()
    except BaseException:
      # An unclosed manager's background threads fail noisily at interpreter exit.
      self.checkpointer.close()
      raise

  def _restore(self) -> int | None:
    if not self.checkpointer.steps():
      return None
    abstract = abstract_with_shardings(self.state_shardings, self.state)
    self.state, data_state, step = self.checkpointer.restore(abstract)
    if data_state:
      self.inputs.train.restore(data_state)
    log.info("resumed from step %d in %s", step, self.checkpointer.directory)
    return step

  def evaluate(self, params, batches) -> dict[str, float]:
    totals = None
    with jax.set_mesh(self.mesh):
      for batch in batches:
        sums = self.eval_step(params, global_batch(batch, self.mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return summarize(jax.device_get(totals))

  def save(self, force: bool = False) -> None:
    step = int(self.state.step)
    # Step 0 is the seed's initialisation: saving it (e.g. after a crash in the first step)
    # would only pin the workdir to a config that may need fixing.
    if step == 0 or step in self.checkpointer.steps():
      return
    self.checkpointer.save(step, self.state, self.inputs.train.state(), force=force)

  def train(self, writer: metrics_lib.MetricWriter) -> None:
    """Runs updates until num_train_steps; the step counter lives on the host to avoid syncs.

    A step is one optimizer update, on grad_accum_steps micro-batches.
    """
    config = self.config
    step = int(self.state.step)
    stop = StopRequested()
    progress = metrics_lib.progress_bar(step, config.num_train_steps)
    window = metrics_lib.ThroughputWindow()
    sums = None
    try:
      with jax.set_mesh(self.mesh):
        while step < config.num_train_steps and not stop.signal:
          batch = next(self.inputs.train)
          self.state, step_metrics = self.train_step(self.state, self._train_batch(batch))
          step += 1
          sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
          window.add(int(np.sum(batch["targets"] != 0)) * jax.process_count())
          progress.update(1)
          if step % config.log_every_steps == 0 or step == config.num_train_steps:
            self._log_train(writer, progress, window, jax.device_get(sums), step)
            sums = None
          if step % config.eval_every_steps == 0 and step < config.num_train_steps:
            eval_metrics = self.evaluate(self.state.params, self.inputs.eval_batches)
            writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
          if step % config.checkpoint_every_steps == 0:
            self.save()
    finally:
      progress.close()
      stop.restore()
      self.save(force=True)
      self.checkpointer.wait()
    if stop.signal:
      log.warning("%s received at step %d: checkpoint saved; run again to resume", stop.signal,
                  step)
      raise KeyboardInterrupt(stop.signal)

  def _train_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch of the training stream as the train step takes it, on the mesh."""
    k = self.grad_accum_steps
    if k == 1:
      return global_batch(batch, self.mesh)
    return global_batch(micro_batches(batch, k), self.mesh, stacked=True)

  def _log_train(self, writer, progress, window, sums, step) -> None:
    steps, nonfinite = float(sums.pop("steps")), int(sums.pop("nonfinite"))
    grad_norm = float(sums.pop("grad_norm")) / steps
    summary = summarize(sums)
    rate = window.tokens_per_second()
    progress.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{rate:,.0f}")
    writer.write(step, {"train/loss": summary["loss"], "train/nll": summary["nll"],
                        "train/accuracy": summary["accuracy"], "train/grad_norm": grad_norm,
                        "train/tokens_per_second": rate, "train/skipped_updates": nonfinite,
                        "train/learning_rate": float(learning_rate(self.config)(step - 1))})
    if nonfinite:
      message = (f"non-finite loss or gradient within steps {step - int(steps) + 1}-{step}: "
                 f"{nonfinite} update(s) skipped, parameters kept at their last finite values")
      if self.config.nan_policy == "stop":
        raise FloatingPointError(message + "; lower the learning rate or set nan_policy=skip")
      log.warning(message)

  def averaged_params(self):
    """Parameters averaged over the last checkpoints (Section 6.1), or the current ones."""
    k = self.config.average_last_checkpoints
    if k <= 1 or len(self.checkpointer.steps()) < 2:
      return self.state.params
    abstract = abstract_with_shardings(self.state_shardings, self.state)
    params, steps = average_params(self.checkpointer, abstract, k)
    log.info("averaged the parameters of checkpoints %s", steps)
    return params


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (or resumes) a run in `workdir`, then evaluates it; returns the final metrics."""
  distributed.initialize(config.parallel)
  trainer = Trainer(config, workdir)
  workdir = Path(workdir)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    trainer.train(writer)
    params = trainer.averaged_params()
    results = {"step": int(trainer.state.step)}
    results.update({f"eval/{k}": v for k, v in
                    trainer.evaluate(params, trainer.inputs.eval_batches).items()})
    if config.task == "translation" and config.decode.bleu_at_end:
      from transformer.decode.evaluate import bleu_report
      results.update(bleu_report(trainer, params, workdir))
    writer.write(results["step"], {k: v for k, v in results.items() if k != "step"})
    if jax.process_index() == 0:
      (workdir / "results.json").write_text(json.dumps(results, indent=2))
      print_summary(results, workdir)
    return results
  finally:
    writer.close()
    trainer.checkpointer.close()


def print_summary(results: dict, workdir: Path) -> None:
  """The run's headline numbers and a few translations, on stdout."""
  print(f"\nstep {results['step']}: validation loss {results['eval/loss']:.3f}, "
        f"perplexity {results['eval/perplexity']:.2f}, accuracy {results['eval/accuracy']:.3f}")
  bleu_file = workdir / "bleu.json"
  if not bleu_file.exists():
    return
  for split, report in json.loads(bleu_file.read_text()).items():
    print(f"{split}: {report['detail']}")
    for example in report["examples"]:
      print(f"  source:      {example['source']}\n  reference:   {example['reference']}\n"
            f"  translation: {example['translation']}")
