"""What a run says about itself: the start-up summary, one line per log step (loss, rate, step
time, tokens/s, MFU, data wait, device memory), the environment it ran in, and profiles.

Process 0 speaks for the run; the others stay quiet.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from transformer.train.flops import datasheet_peak, measured_matmul_peak

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


def peak_flop_per_s(compute_dtype: str, cache_dir: Path | None = None) -> tuple[float | None, str]:
  """(peak FLOP/s, how it was found) for MFU: the datasheet's 16-bit rate for a known
  accelerator computing in 16 bits, else the rate of the matmul the benchmarks time (4096^2 on
  a CPU, 8192^2 elsewhere; `benchmarks/train_mfu`), so the log's MFU and the benchmark's agree.
  That takes a few seconds on a CPU, so it is measured once per device, dtype and JAX version
  and kept in `cache_dir`/peaks.json."""
  sheet = datasheet_peak()
  if sheet and compute_dtype in ("bfloat16", "float16"):
    return sheet, f"datasheet {jax.devices()[0].device_kind}"
  n = 4096 if jax.default_backend() == "cpu" else 8192
  key = f"{jax.devices()[0].device_kind} | {compute_dtype} | {n}^2 @ {n}^2 | jax {jax.__version__}"
  path = cache_dir / "peaks.json" if cache_dir else None
  known = _read_peaks(path)
  if key in known:
    return known[key]["flop_per_s"], f"{n}^2 matmul measured {known[key]['measured']}"
  try:
    rate = measured_matmul_peak(jnp.dtype(compute_dtype), n=n, runs=5)
  except Exception as error:
    log.warning("no matmul peak (%s): MFU is left out", error)
    return None, "none"
  if path is not None:
    when = datetime.datetime.now().isoformat(timespec="seconds")
    known[key] = {"flop_per_s": rate, "measured": when}
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
      tmp.write_text(json.dumps(known, indent=1) + "\n")
      os.replace(tmp, path)
    except OSError:
      pass  # a cache that cannot be written only means measuring again next time
  return rate, f"{n}^2 matmul measured now"


def _read_peaks(path: Path | None) -> dict[str, Any]:
  try:
    values = json.loads(path.read_text()) if path is not None and path.is_file() else {}
  except (OSError, ValueError):
    return {}
  return values if isinstance(values, dict) else {}


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


def startup_lines(
  *,
  task: str,
  model,
  parameters: int,
  mesh,
  strategy: str,
  data_counts: dict[str, int],
  test_sets: list[tuple[str, int]],
  tokens_per_update: int,
  layout: str,
  resumed_from: int | None,
  peak: tuple[float | None, str],
) -> list[str]:
  """The start-up summary: what is trained, on what, from which data, in what batches."""
  devices = jax.devices()
  model_line = (
    f"model: {task}, {parameters / 1e6:,.2f}M parameters (d_model {model.d_model}, "
    f"{model.num_encoder_layers}+{model.num_decoder_layers} layers, {model.num_heads} "
    f"heads, d_ff {model.d_ff}, vocabulary {model.vocab_size}, compute {model.dtype})"
  )
  devices_line = (
    f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
    f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}, strategy "
    f"{strategy}"
  )
  data_line = (
    f"data: training pairs {data_counts.get('kept', 0):,} of "
    f"{data_counts.get('pairs', 0):,}" + "".join(f", {name} {size:,}" for name, size in test_sets)
  )
  lines = [
    model_line,
    devices_line,
    data_line,
    f"batches: {tokens_per_update:,} target tokens (with padding) per update, {layout}",
    "starting at step 0" if resumed_from is None else f"resumed from step {resumed_from}",
  ]
  value, how = peak
  lines.append(f"MFU against {value / 1e12:,.3g} TFLOP/s ({how})" if value else "MFU: no peak")
  return lines


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
      history = json.loads(path.read_text())
    except ValueError:
      log.warning("%s is not valid JSON; starting it again", path)
    if not isinstance(history, list):
      history = []
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps([*history, record], indent=1) + "\n")
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
