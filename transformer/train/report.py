"""What a run says about itself: the start-up summary, one line per log step (loss, rate, step
time, tokens/s, MFU, data wait, device memory), the environment it ran in, and profiles.

Process 0 speaks for the run; the others stay quiet.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from transformer.errors import UserError
from transformer.train.flops import datasheet_peak, measured_matmul_peak
from transformer.train.loss import summarize
from transformer.train.metrics import process_age_s

if TYPE_CHECKING:
  from transformer.train.setup import Run
  from transformer.train.step import TrainState

log = logging.getLogger(__name__)

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "numpy",
  "sentencepiece",
  "sacrebleu",
  "tensorflow-datasets",
  "transformer",
)
ENVIRONMENT_FILENAME = "environment.json"
PROFILE_DIRNAME = "profile"


class StepWindow:
  """Steps, tokens, model FLOPs and time spent waiting for data since the last report."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.start, self.steps, self.tokens, self.flops, self.waited = (
      time.perf_counter(),
      0,
      0,
      0.0,
      0.0,
    )

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation) out of the window's time: they were not steps."""
    self.start += seconds

  def add(self, tokens: int, flops: float, waited_s: float) -> None:
    self.steps += 1
    self.tokens += tokens
    self.flops += flops
    self.waited += waited_s

  def report(self, peak_flop_per_s: float | None) -> dict[str, float]:
    """Rates over the window (call after the device finished its steps), then a new window."""
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    out = {
      "step_time_s": elapsed / max(self.steps, 1),
      "tokens_per_second": self.tokens / elapsed,
      "model_flops_per_second": self.flops / elapsed,
      "data_wait_fraction": self.waited / elapsed,
    }
    if peak_flop_per_s:
      out["mfu"] = out["model_flops_per_second"] / peak_flop_per_s
    self.reset()
    return out


def peak_flop_per_s(
  compute_dtype: str, cache_dir: Path | None = None, *, remeasure: bool = False
) -> tuple[float | None, str]:
  """(peak FLOP/s, how it was found) for MFU: the datasheet's 16-bit rate for a known
  accelerator computing in 16 bits, else the rate of an n x n matmul (1024^2 on a CPU, 8192^2
  elsewhere).

  A measurement takes ~0.3 s on a CPU core and is kept in `cache_dir`/peaks.json under a key
  naming the processor (its model and the cores this process may use), the dtype, the size and
  the JAX version; it is the best of several tries (a machine busy with other work only slows a
  try down). `remeasure` measures again and replaces the kept value.
  """
  sheet = datasheet_peak()
  if sheet and compute_dtype in ("bfloat16", "float16"):
    return sheet, f"datasheet {jax.devices()[0].device_kind}"
  # 1024^2 on a CPU: its rate is already the large sizes' (one core of a Xeon, best of 3 tries:
  # 139-147 GFLOP/s at 1024^2, 143-144 at 2048^2) for 0.3 CPU s of a first run's start instead
  # of 2.0 s (4096^2 took ~35 s).
  n = 1024 if jax.default_backend() == "cpu" else 8192
  key = f"{processor()} | {compute_dtype} | {n}^2 @ {n}^2 | jax {jax.__version__}"
  path = cache_dir / "peaks.json" if cache_dir else None
  known = _read_peaks(path)
  if key in known and not remeasure:
    return known[key][
      "flop_per_s"
    ], f"{n}^2 matmul, best of {PEAK_TRIES} tries, {known[key]['measured']}"
  try:
    rate = max(
      measured_matmul_peak(jnp.dtype(compute_dtype), n=n, runs=3) for _ in range(PEAK_TRIES)
    )
  except Exception as error:  # no peak only means no MFU in the log
    log.warning("no matmul peak (%s): MFU is left out", error)
    return None, "none"
  if path is not None:
    when = datetime.datetime.now().isoformat(timespec="seconds")
    known[key] = {"flop_per_s": rate, "measured": when}
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
      tmp.write_text(json.dumps(known, indent=1) + "\n", encoding="utf-8")
      os.replace(tmp, path)
    except OSError:
      pass  # a cache that cannot be written only means measuring again next time
  return rate, f"{n}^2 matmul, best of {PEAK_TRIES} tries, measured now"


PEAK_TRIES = 3


def processor() -> str:
  """What the peak depends on: the device kind, and on a CPU its model name and the number of
  cores this process may run on (`os.sched_getaffinity`)."""
  kind = jax.devices()[0].device_kind
  if jax.default_backend() != "cpu":
    return kind
  model = kind
  try:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{model}, {cores} cores"


def elapsed_at(workdir: Path, step: int) -> float:
  """The seconds a run had spent by `step`, from its metrics.jsonl (the last time/elapsed_s
  recorded at or before it): for checkpoints that predate keeping it themselves."""
  best = 0.0
  try:
    with open(Path(workdir) / "metrics.jsonl", encoding="utf-8") as lines:
      for line in lines:
        try:
          record = json.loads(line)
        except ValueError:
          continue  # a line cut short by a crash
        if record.get("step", step + 1) <= step and "time/elapsed_s" in record:
          best = max(best, float(record["time/elapsed_s"]))
  except OSError:
    pass
  return best


def _read_peaks(path: Path | None) -> dict[str, Any]:
  """The kept peaks; a file that is damaged or holds anything but numbers is ignored (and
  replaced by the next measurement)."""
  try:
    values = (
      json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}
    )
  except (OSError, ValueError):
    return {}
  if not isinstance(values, dict):
    return {}
  return {
    key: value
    for key, value in values.items()
    if isinstance(value, dict)
    and isinstance(value.get("flop_per_s"), int | float)
    and not isinstance(value["flop_per_s"], bool)
    and math.isfinite(value["flop_per_s"])
    and value["flop_per_s"] > 0
    and isinstance(value.get("measured"), str)
  }


def device_memory() -> dict[str, int]:
  """Bytes in use, at peak and allowed on the first device, where the backend reports them."""
  stats = jax.local_devices()[0].memory_stats() or {}
  names = {"bytes_in_use": "in_use", "peak_bytes_in_use": "peak", "bytes_limit": "limit"}
  return {ours: int(stats[theirs]) for theirs, ours in names.items() if theirs in stats}


def step_line(
  step: int,
  total: int,
  loss: float,
  learning_rate: float,
  rates: dict[str, float],
  memory: dict[str, int],
) -> str:
  """One plain log line: step 300/900 loss 4.501 lr 9.8e-04 412 ms/step 2,722 tok/s ..."""
  parts = [
    f"step {step}/{total}",
    f"loss {loss:.3f}",
    f"lr {learning_rate:.2e}",
    f"{rates['step_time_s'] * 1e3:,.0f} ms/step",
    f"{rates['tokens_per_second']:,.0f} tok/s",
  ]
  if "mfu" in rates:
    parts.append(f"MFU {rates['mfu']:.1%}")
  parts.append(f"data wait {rates['data_wait_fraction']:.1%}")
  if "in_use" in memory:
    limit = f"/{memory['limit'] / 1e9:.1f}" if "limit" in memory else ""
    parts.append(f"memory {memory['in_use'] / 1e9:.1f}{limit} GB")
  return "  ".join(parts)


def startup_lines(run: Run) -> list[str]:
  """The start-up summary: what is trained, on what, from which data, in what batches."""
  config, inputs, mesh = run.config, run.inputs, run.mesh
  model, data, k = config.model, config.data, config.optimizer.grad_accum_steps
  if config.task != "translation":
    layout = f"windows of {data.max_len} tokens"
  elif data.packing:
    layout = f"pairs packed into rows of {data.max_len} tokens"
  else:
    layout = f"length buckets {data.length_buckets or 'up to ' + str(data.max_len)}"
  sets = [(data.eval_split, len(inputs.validation.pairs))] if inputs.validation else []
  sets += [(test.name, len(test.pairs)) for test in inputs.test_sets]
  devices = jax.devices()
  counts = inputs.train_pairs
  value, how = run.peak
  # The stacks the task builds: a language model has no encoder, a masked LM no decoder.
  layers = {
    "lm": f"{model.num_decoder_layers} decoder layers",
    "mlm": f"{model.num_encoder_layers} encoder layers",
  }.get(config.task, f"{model.num_encoder_layers}+{model.num_decoder_layers} layers")
  return [
    (
      f"model: {config.task}, {run.parameters / 1e6:,.2f}M parameters (d_model {model.d_model}, "
      f"{layers}, {model.num_heads} "
      f"heads, d_ff {model.d_ff}, vocabulary {model.vocab_size}, compute {model.dtype})"
    ),
    (
      f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
      f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}, strategy "
      f"{config.parallel.strategy}"
    ),
    f"data: training pairs {counts.get('kept', 0):,} of {counts.get('pairs', 0):,}"
    + "".join(f", {name} {size:,}" for name, size in sets),
    f"batches: up to {data.tokens_per_batch * k:,} target tokens (with padding) per update, "
    f"{layout}" + (f", {k} micro-batches an update" if k > 1 else ""),
    "starting at step 0"
    if run.resumed_from is None
    else f"resumed from step {run.resumed_from} ({run.elapsed_before:,.0f} s spent before)",
    f"MFU against {value / 1e12:,.3g} TFLOP/s ({how})" if value else "MFU: no peak",
  ]


def applied_learning_rate(run: Run, state: TrainState) -> float:
  """The rate of the last update Adam applied: the schedule at Adam's own count, which skipped
  updates (nan_policy=skip) did not advance, not at the step count."""
  counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
  applied = int(jax.device_get(counts[0][1])) if counts else int(state.step)
  return float(run.schedule(max(applied, 1) - 1))


def log_window(
  run: Run, state: TrainState, writer, window: StepWindow, sums, step: int
) -> dict[str, str]:
  """Writes the scalars of the steps since the last report (metric sums `sums`, host values)
  and logs their line on process 0; a non-finite update stops the run or is warned about, as
  nan_policy says. Returns the loss and tokens/s for a progress bar."""
  steps, nonfinite = float(sums.pop("steps")), int(sums.pop("nonfinite"))
  grad_norm = float(sums.pop("grad_norm")) / steps
  summary = summarize(sums)
  rates = window.report(run.peak[0])
  memory = device_memory()
  rate = applied_learning_rate(run, state)
  scalars = {
    "train/loss": summary["loss"],
    "train/nll": summary["nll"],
    "train/accuracy": summary["accuracy"],
    "train/grad_norm": grad_norm,
    "train/skipped_updates": nonfinite,
    "train/learning_rate": rate,
    **{f"train/{name}": value for name, value in rates.items()},
  }
  if "in_use" in memory:
    scalars["train/device_memory_bytes"] = memory["in_use"]
  writer.write(step, scalars)
  total = run.config.num_train_steps
  if jax.process_index() == 0:
    log.info(step_line(step, total, summary["loss"], rate, rates, memory))
  if nonfinite:
    message = (
      f"non-finite loss or gradient within steps {step - int(steps) + 1}-{step}: "
      f"{nonfinite} update(s) skipped, parameters kept at their last finite values"
    )
    if run.config.nan_policy == "stop":
      raise UserError(message + "; lower the learning rate or set nan_policy=skip")
    log.warning(message)
  return {"loss": f"{summary['loss']:.3f}", "tok_s": f"{rates['tokens_per_second']:,.0f}"}


def print_summary(results: dict, workdir: Path) -> None:
  """The run's headline numbers and a few translations, on stdout."""
  print(
    f"\nstep {results['step']}: validation loss {results['eval/loss']:.3f}, "
    f"perplexity {results['eval/perplexity']:.2f}, accuracy {results['eval/accuracy']:.3f}"
  )
  bleu_file = workdir / "bleu.json"
  if not bleu_file.exists():
    return
  for split, scores in json.loads(bleu_file.read_text(encoding="utf-8")).items():
    print(f"{split}: {scores['detail']}")
    for example in scores["examples"]:
      print(
        f"  source:      {example['source']}\n  reference:   {example['reference']}\n"
        f"  translation: {example['translation']}"
      )


# ------------------------------------------------------------------------------------------------
# environment.json
# ------------------------------------------------------------------------------------------------


def _git_commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      timeout=10,
      cwd=Path(__file__).resolve().parent,
    )
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment_record(mesh=None) -> dict[str, Any]:
  """Python, library versions, devices, processes, mesh, command line, git commit, host, time."""
  versions: dict[str, str | None] = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  return {
    "time": datetime.datetime.now().isoformat(timespec="seconds"),
    "host": socket.gethostname(),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "versions": versions,
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "local_device_count": jax.local_device_count(),
    "process_count": jax.process_count(),
    "mesh": dict(mesh.shape) if mesh is not None else None,
    "command": [sys.executable, *sys.argv],
    "git_commit": _git_commit(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def append_environment(workdir: Path, record: dict[str, Any]) -> None:
  """Adds `record` to WORKDIR/environment.json, a list with one record per start (a resumed
  run keeps the history); written to a temporary file first, then renamed over the old one."""
  path = Path(workdir) / ENVIRONMENT_FILENAME
  history = []
  if path.exists():
    try:
      history = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
      log.warning("%s is not valid JSON; starting it again", path)
    if not isinstance(history, list):
      history = []
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps([*history, record], indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Profiles on demand
# ------------------------------------------------------------------------------------------------


class Profiler:
  """A `jax.profiler` trace of steps first..last (1-based, inclusive) into WORKDIR/profile:
  TensorBoard's profile plugin reads its .xplane.pb, Perfetto its perfetto_trace.json.gz."""

  def __init__(self, workdir: Path, steps: tuple[int, ...]):
    self.directory = Path(workdir) / PROFILE_DIRNAME
    self.first, self.last = (steps[0], steps[-1]) if steps else (0, -1)
    self.active = False

  def before(self, step: int) -> None:
    """Called before step `step` (1-based) is dispatched."""
    if step == self.first and not self.active:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Called after step `step` was dispatched, with its outputs (waited for at the end)."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.stop()
      log.info("profile of steps %d-%d written to %s", self.first, self.last, self.directory)

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def first_step_done(state: Any, *, batch_at: float) -> None:
  """Logs when the first batch arrived and when its step (compiling included) was done."""
  jax.block_until_ready(state)
  age = process_age_s()
  log.info(
    "first training batch %.1f s after the process started; first step "
    "(compiling included) done at %.1f s",
    age - (time.perf_counter() - batch_at),
    age,
  )
