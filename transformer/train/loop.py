"""The training loop: config -> data -> sharded state -> jitted steps -> checkpoints -> BLEU."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from transformer import compilation_cache
from transformer.cli import Stopped
from transformer.data.corpus import default_cache_dir
from transformer.data.inputs import Inputs, build_inputs, prepare
from transformer.decode.scoring import score_test_sets, write_report
from transformer.model.transformer import create_model
from transformer.parallel import distributed
from transformer.parallel.axes import FSDP, TENSOR
from transformer.parallel.mesh import (
  batch_sharding,
  check_divisible,
  data_ways,
  global_batch,
  make_mesh,
  replicated,
)
from transformer.parallel.sharding import abstract_with_shardings, shard
from transformer.parallel.strategies import compile_train_step
from transformer.runs.artifact import export_model
from transformer.runs.checkpoint import Checkpointer, average_params
from transformer.runs.loading import host_params, warm_start_params
from transformer.runs.lock import WorkdirLock
from transformer.runs.params import load_matching
from transformer.runs.spec import RunSpec
from transformer.train import metrics as metrics_lib
from transformer.train import report
from transformer.train.config import Config
from transformer.train.flops import available_memory_bytes, parameter_count, step_flops
from transformer.train.loss import summarize
from transformer.train.optimizer import learning_rate, make_optimizer
from transformer.train.preemption import StopRequest
from transformer.train.step import TrainState, make_steps

log = logging.getLogger(__name__)


def check_memory(config: Config, mesh) -> int:
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
    raise ValueError(
      f"the model has {count / 1e6:,.0f}M parameters, whose weights, gradients and Adam state "
      f"need {per_device / 1e9:,.1f} GB on each device, more than the {available / 1e9:,.1f} GB "
      "available: shrink it (model.d_model, model.d_ff, the layers, data.vocab_size) or shard it "
      "over more devices (parallel.fsdp)"
    )
  return count


def initial_state(model: nnx.Module, tx) -> TrainState:
  """Step 0: the model's parameters and the optimizer's fresh state, on the host."""
  params = nnx.state(model, nnx.Param)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


class Trainer:
  """Owns a run's mesh, state, compiled steps and checkpoints."""

  def __init__(self, config: Config | ml_collections.ConfigDict, workdir: str | Path):
    config = Config.of(config)
    self.config, self.workdir = config, Path(workdir)
    if not str(workdir).strip():
      raise ValueError("--workdir is empty: name the run's directory, e.g. --workdir runs/exp1")
    self._closers: list = []  # what close() stops or releases, newest first
    try:
      self._build(config)
    except BaseException:
      # Threads of a half-built trainer (checkpointing, prefetching) would fail noisily at exit.
      self.close()
      raise

  def _build(self, config: Config) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    # One writer per workdir; process 0 holds the lock for the whole job.
    distributed.on_first_process(
      self._take_lock, "taking-the-workdir-lock", timeout_s=config.parallel.barrier_timeout_s
    )
    self.mesh = make_mesh(config.parallel)
    # Before any data work, so a mesh that cannot split the model or the evaluation batches
    # fails in seconds. The tokenizer has exactly data.vocab_size pieces.
    model = config.model
    check_divisible(
      self.mesh,
      num_heads=model.num_heads,
      d_ff=model.d_ff,
      d_model=model.d_model,
      vocab_size=model.vocab_size,
      batch_size=config.data.eval_batch_size,
    )
    self.parameters = check_memory(config, self.mesh)
    k = config.optimizer.grad_accum_steps
    # One training batch is one update: k micro-batches of data.tokens_per_batch each, whose
    # rows the step splits (`transformer.train.step.micro_batches`).
    # Process 0 prepares the tokenizer and the token caches; the others then only read them.
    cache_dir = (
      Path(config.data.cache_dir)
      if config.data.cache_dir
      else default_cache_dir(self.workdir, jax.process_count())
    )
    distributed.on_first_process(
      lambda: prepare(config.data, self.workdir, cache_dir=cache_dir, task=config.task),
      "preparing-the-data",
      timeout_s=config.parallel.barrier_timeout_s,
    )
    self.inputs: Inputs = build_inputs(
      config.data,
      self.workdir,
      task=config.task,
      seed=config.seed,
      batch_tokens=config.data.tokens_per_batch * k,
      batch_multiple=data_ways(self.mesh) * k,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      cache_dir=cache_dir,
      prepare_data=False,
    )
    self._closers.append(self.inputs.train.close)
    self.model = create_model(config.task, model, config.seed)
    if config.init_from:
      self._warm_start(config.init_from)
    self.schedule = learning_rate(
      config.optimizer, d_model=model.d_model, num_train_steps=config.num_train_steps
    )
    self.tx = make_optimizer(
      config.optimizer, d_model=model.d_model, num_train_steps=config.num_train_steps
    )
    self.state, self.state_shardings = shard(initial_state(self.model, self.tx), self.mesh)
    graphdef, _, *rest = nnx.split(self.model, nnx.Param, ...)  # one State per filter
    self.graphdef: nnx.GraphDef = graphdef
    self.rest: nnx.State = rest[0]  # dropout RNG streams: everything but the parameters
    steps = make_steps(
      self.graphdef,
      self.rest,
      self.tx,
      task=config.task,
      label_smoothing=config.label_smoothing,
      dropout_key=jax.random.key(config.seed + 1),
      grad_accum_steps=k,
    )
    self.train_step = compile_train_step(
      config.parallel.strategy, steps, self.state_shardings, self.mesh
    )
    self.eval_step = jax.jit(
      steps.eval_step,
      in_shardings=(self.state_shardings.params, batch_sharding(self.mesh)),
      out_shardings=replicated(self.mesh),
    )
    self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=config.keep_checkpoints)
    self._closers.append(self.checkpointer.close)
    self.resumed_from = self._restore()
    # Process 0 reports for the run, MFU included.
    self.peak = (
      report.peak_flop_per_s(config.model.dtype, cache_dir)
      if jax.process_index() == 0
      else (None, "")
    )

  def _take_lock(self) -> None:
    lock = WorkdirLock(self.workdir, "training")
    self._closers.append(lock.release)

  def close(self) -> None:
    """Waits for the last checkpoint, stops the checkpointer's and the stream's threads, and
    releases the workdir."""
    while self._closers:
      self._closers.pop()()

  def _warm_start(self, run: str) -> None:
    """Starts from another run's parameters (its exported model, else its newest checkpoint):
    every parameter whose name and shape match; a new head keeps its fresh initialisation."""
    params, tokenizer_path, source = warm_start_params(run)
    if Path(tokenizer_path).read_bytes() != self.inputs.tokenizer.model_path.read_bytes():
      raise ValueError(
        f"init_from {run}: its tokenizer ({tokenizer_path}) is not this run's "
        f"({self.inputs.tokenizer.model_path}), so its embeddings would mean "
        "other pieces: train this run with that run's tokenizer (copy its "
        "spm.model into the workdir first) or start afresh"
      )
    copied, fresh = load_matching(self.model, params)
    if not copied:
      raise ValueError(
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

  def evaluation(self, params) -> dict[str, float]:
    """Validation loss, perplexity and accuracy, the validation split's greedy BLEU (translation,
    decode.validation_bleu), and how long the run has taken so far: one point of its curves."""
    scalars = {f"eval/{k}": v for k, v in self.evaluate(params, self.inputs.eval_batches).items()}
    if (
      self.config.task == "translation"
      and self.config.decode.validation_bleu
      and self.inputs.validation is not None
    ):
      model = nnx.merge(self.graphdef, params, self.rest)
      model.eval()
      greedy = dataclasses.replace(self.config.decode, beam_size=1, num_examples=0)
      report_ = score_test_sets(
        model, [self.inputs.validation], self.inputs.tokenizer, greedy, self.mesh
      )
      scalars["eval/bleu_greedy"] = report_[self.inputs.validation.name]["bleu"]
    scalars["time/elapsed_s"] = metrics_lib.process_age_s()
    return scalars

  def save(self, force: bool = False) -> None:
    step = int(self.state.step)
    # Step 0 is the seed's initialisation: saving it (e.g. after a crash in the first step)
    # would only pin the workdir to a config that may need fixing.
    if step == 0 or step in self.checkpointer.steps():
      return
    self.checkpointer.save(step, self.state, self.inputs.train.state(), force=force)

  def train(self, writer: metrics_lib.MetricWriter) -> None:
    """Runs updates until num_train_steps; the step counter lives on the host to avoid syncs.

    A step is one optimizer update, on grad_accum_steps micro-batches. A signal stops the loop
    after the same step on every process (`StopRequest`); that step is saved, then `Stopped`
    is raised.
    """
    config = self.config
    step = int(self.state.step)
    stop = StopRequest()
    progress = metrics_lib.Progress(step, config.num_train_steps, enabled=jax.process_index() == 0)
    window = report.StepWindow()
    profiler = report.Profiler(self.workdir, config.profile_steps)
    sums, first = None, True
    try:
      with jax.set_mesh(self.mesh):
        while step < config.num_train_steps and not stop.stop_now(step):
          profiler.before(step + 1)
          asked = time.perf_counter()
          batch = next(self.inputs.train)
          waited = time.perf_counter() - asked
          self.state, step_metrics = self.train_step(self.state, global_batch(batch, self.mesh))
          step += 1
          if first:  # compilation is not a step: the first window starts after it
            jax.block_until_ready(self.state)
            age = metrics_lib.process_age_s()
            log.info(
              "first training batch %.1f s after the process started; first step "
              "(compiling included) done at %.1f s",
              age - (time.perf_counter() - asked - waited),
              age,
            )
            window.reset()
            first = False
          else:
            window.add(
              int(np.sum(batch["targets"] != 0)) * jax.process_count(),
              step_flops(config.task, config.model, batch) * jax.process_count(),
              waited,
            )
          profiler.after(step, self.state)
          sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
          progress.update(1)
          if step % config.log_every_steps == 0 or step == config.num_train_steps:
            self._log_train(writer, progress, window, jax.device_get(sums), step)
            sums = None
          if step % config.eval_every_steps == 0 and step < config.num_train_steps:
            evaluating = time.perf_counter()
            writer.write(step, self.evaluation(self.state.params))
            window.exclude(time.perf_counter() - evaluating)
          if step % config.checkpoint_every_steps == 0:
            self.save()
    finally:
      profiler.stop()
      progress.close()
      try:
        self.save(force=True)
        self.checkpointer.wait()
      finally:  # a second signal while saving only repeats the request: the save completes
        stop.restore()
    if stop.reason:
      saved = self.checkpointer.steps()
      raise Stopped(
        f"{stop.reason} at step {step}; "
        + (
          f"checkpoint {saved[-1]} is saved, run the same command to resume"
          if saved
          else "nothing was trained yet, so nothing was saved"
        )
      )

  def _log_train(self, writer, progress, window, sums, step) -> None:
    steps, nonfinite = float(sums.pop("steps")), int(sums.pop("nonfinite"))
    grad_norm = float(sums.pop("grad_norm")) / steps
    summary = summarize(sums)
    rates = window.report(self.peak[0])
    memory = report.device_memory()
    learning_rate = self.learning_rate()
    progress.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{rates['tokens_per_second']:,.0f}")
    scalars = {
      "train/loss": summary["loss"],
      "train/nll": summary["nll"],
      "train/accuracy": summary["accuracy"],
      "train/grad_norm": grad_norm,
      "train/skipped_updates": nonfinite,
      "train/learning_rate": learning_rate,
      **{f"train/{name}": value for name, value in rates.items()},
    }
    if "in_use" in memory:
      scalars["train/device_memory_bytes"] = memory["in_use"]
    writer.write(step, scalars)
    if jax.process_index() == 0:
      log.info(
        report.step_line(
          step, self.config.num_train_steps, summary["loss"], learning_rate, rates, memory
        )
      )
    if nonfinite:
      message = (
        f"non-finite loss or gradient within steps {step - int(steps) + 1}-{step}: "
        f"{nonfinite} update(s) skipped, parameters kept at their last finite values"
      )
      if self.config.nan_policy == "stop":
        raise FloatingPointError(message + "; lower the learning rate or set nan_policy=skip")
      log.warning(message)

  def startup_lines(self) -> list[str]:
    inputs, config = self.inputs, self.config
    k = config.optimizer.grad_accum_steps
    data = config.data
    if config.task != "translation":
      layout = f"windows of {data.max_len} tokens"
    elif data.packing:
      layout = f"pairs packed into rows of {data.max_len} tokens"
    else:
      layout = f"length buckets {data.length_buckets or 'up to ' + str(data.max_len)}"
    sets = [(data.eval_split, len(inputs.validation.pairs))] if inputs.validation else []
    sets += [(test.name, len(test.pairs)) for test in inputs.test_sets]
    return report.startup_lines(
      task=config.task,
      model=config.model,
      parameters=self.parameters,
      mesh=self.mesh,
      strategy=config.parallel.strategy,
      data_counts=inputs.train_pairs,
      test_sets=sets,
      tokens_per_update=data.tokens_per_batch * k,
      layout=layout + (f", {k} micro-batches an update" if k > 1 else ""),
      resumed_from=self.resumed_from,
      peak=self.peak,
    )

  def learning_rate(self) -> float:
    """The rate of the last update Adam applied: the schedule at Adam's own count, which
    skipped updates (nan_policy=skip) did not advance, not at the step count."""
    counts = optax.tree_utils.tree_get_all_with_path(self.state.opt_state, "count")
    applied = int(jax.device_get(counts[0][1])) if counts else int(self.state.step)
    return float(self.schedule(max(applied, 1) - 1))

  def final_params(self) -> tuple[nnx.State, list[int]]:
    """(parameters, the checkpoints they average): the mean of the last checkpoints'
    (Section 6.1) with average_last_checkpoints > 1, else the current ones ([])."""
    k = self.config.average_last_checkpoints
    if k <= 1 or len(self.checkpointer.steps()) < 2:
      return self.state.params, []
    abstract = abstract_with_shardings(self.state_shardings, self.state)
    params, steps = average_params(self.checkpointer, abstract, k)
    log.info("averaged the parameters of checkpoints %s", steps)
    return params, steps

  def export(self, params: nnx.State, averaged_steps: list[int]) -> Path | None:
    """Writes `params` as the run's model (WORKDIR/model, see `transformer.runs.artifact`);
    every process takes part in gathering them, process 0 writes."""
    flat = host_params(params)
    if jax.process_index() != 0:
      return None
    spec = RunSpec(self.config.task, self.config.model, self.config.data.max_len)
    info = {"step": int(self.state.step), "averaged_steps": averaged_steps}
    path = export_model(self.workdir, spec, flat, self.inputs.tokenizer.model_path, info)
    log.info("model written to %s", path)
    return path


def run(config: Config | ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (or resumes) a run in `workdir`, then evaluates it; returns the final metrics.

  `config` is a `Config` or a recipe's ConfigDict (`transformer.configs.default.get_config()`).
  """
  config = Config.of(config)
  compilation_cache.enable()
  distributed.initialize(config.parallel)
  if jax.process_index() != 0:  # process 0 speaks for the run; the others only warn
    logging.getLogger("transformer").setLevel(logging.WARNING)
  trainer = Trainer(config, workdir)
  workdir = Path(workdir)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    report.append_environment(workdir, report.environment_record(trainer.mesh))
    for line in trainer.startup_lines():
      log.info(line)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    trainer.train(writer)
    params, averaged_steps = trainer.final_params()
    trainer.export(params, averaged_steps)  # the model scored below is the model one uses
    results: dict[str, float] = {"step": int(trainer.state.step)}
    results.update(trainer.evaluation(params))
    if config.task == "translation" and config.decode.bleu_at_end and trainer.inputs.test_sets:
      model = nnx.merge(trainer.graphdef, params, trainer.rest)
      model.eval()
      scores = score_test_sets(
        model,
        trainer.inputs.test_sets,
        trainer.inputs.tokenizer,
        config.decode,
        trainer.mesh,
        workdir / "translations",
      )
      write_report(scores, workdir / "bleu.json")
      results.update({f"bleu/{split}": r["bleu"] for split, r in scores.items()})
    writer.write(int(results["step"]), {k: v for k, v in results.items() if k != "step"})
    if jax.process_index() == 0:
      (workdir / "results.json").write_text(json.dumps(results, indent=2))
      print_summary(results, workdir)
    return results
  finally:
    writer.close()
    trainer.close()


def print_summary(results: dict, workdir: Path) -> None:
  """The run's headline numbers and a few translations, on stdout."""
  print(
    f"\nstep {results['step']}: validation loss {results['eval/loss']:.3f}, "
    f"perplexity {results['eval/perplexity']:.2f}, accuracy {results['eval/accuracy']:.3f}"
  )
  bleu_file = workdir / "bleu.json"
  if not bleu_file.exists():
    return
  for split, scores in json.loads(bleu_file.read_text()).items():
    print(f"{split}: {scores['detail']}")
    for example in scores["examples"]:
      print(
        f"  source:      {example['source']}\n  reference:   {example['reference']}\n"
        f"  translation: {example['translation']}"
      )
