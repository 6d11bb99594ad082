"""Shared benchmark tools: environment record, compile-apart timing, memory, matmul peak, MFU, JSON.

How every number is obtained:
  * compile: `jax.jit(f).lower(*args).compile()`, timed on its own (tracing + XLA compilation);
  * warm-up: the compiled function runs `warmup` times untimed (first-touch allocations, caches);
  * sync: each timed call ends in `jax.block_until_ready` on its outputs, so the clock stops when
    the device is done, not when the asynchronous dispatch returns;
  * statistics: median, min and max over >= 5 timed calls, and more until the timed calls add
    up to >= 1 s (at most 200); rates use the median.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from transformer.cli import ArgumentParser

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIN_RUNS = 5
MAX_RUNS = 200


# ---------------------------------------------------------------------------------------------
# Command line and presets
# ---------------------------------------------------------------------------------------------


def argument_parser(description: str) -> argparse.ArgumentParser:
  """The flags every script shares: --preset quick|full, --runs, --out."""
  parser = ArgumentParser(description=description)
  parser.add_argument(
    "--preset",
    choices=("quick", "full"),
    default="full",
    help="quick: a few small shapes to check the script runs; full: the sweep",
  )
  parser.add_argument(
    "--runs", type=int, default=MIN_RUNS, help=f"timed calls per measurement (at least {MIN_RUNS})"
  )
  parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON results")
  return parser


def parse_args(parser: argparse.ArgumentParser | str, argv=None) -> argparse.Namespace:
  """The arguments, checked before anything is measured: --runs, and an --out folder that can be
  written (a results file that cannot be written after a long run would lose the run)."""
  if isinstance(parser, str):
    parser = argument_parser(parser)
  args = parser.parse_args(argv)
  if args.runs < MIN_RUNS:
    parser.error(f"--runs must be at least {MIN_RUNS} (medians of fewer calls are noise)")
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    parser.error(f"--out {out} is a file: give a folder for the results")
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test-{os.getpid()}"
    probe.write_text("", encoding="utf-8")
    probe.unlink()
  except OSError as error:
    parser.error(f"--out {out} cannot be written ({error.strerror}): give a writable folder")
  return args


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
  try:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
  except OSError:
    return platform.processor() or "unknown"
  match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
  return match.group(1).strip() if match else "unknown"


def cpu_cores() -> int:
  """Cores this process may run on (the affinity mask), not the host's total."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def device_kind() -> str:
  device = jax.devices()[0]
  return cpu_model() if device.platform == "cpu" else device.device_kind


def device_slug() -> str:
  """The device in file names: 'cpu-amd-epyc-2c', 'gpu-nvidia-h100-80gb-hbm3'."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    name = f"cpu-{cpu_model()}-{cpu_cores()}c"
  else:
    name = f"{device.platform}-{device.device_kind}"
  name = re.sub(r"\((r|tm)\)|cpu @.*$|processor", "", name.lower())
  return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _git(*args: str) -> str | None:
  """Output of a read-only git command in the repository, None outside a git checkout."""
  try:
    done = subprocess.run(
      ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout


@functools.cache
def git_state() -> dict[str, Any]:
  """The commit the measured code was checked out at, and whether it had local changes.

  Read once per process: the code that ran is the code this process started with. Changes under
  benchmarks/results/ do not make the tree dirty, since the benchmarks write there themselves.
  `--no-optional-locks` keeps `git status` from taking the index lock (it would otherwise
  refresh the index and could collide with a git command run at the same time).
  """
  commit = _git("rev-parse", "HEAD")
  if commit is None:
    return {"git_commit": None, "git_dirty": None}
  status = _git(
    "--no-optional-locks", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"
  )
  dirty = None if status is None else bool(status.strip())
  return {"git_commit": commit.strip(), "git_dirty": dirty}


def environment() -> dict[str, Any]:
  import flax
  import jaxlib
  import optax

  device = jax.devices()[0]
  return {
    "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device": device_slug(),
    "device_kind": device_kind(),
    "platform": device.platform,
    "device_count": jax.device_count(),
    "cpu_model": cpu_model(),
    "cpu_cores": cpu_cores(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "matmul_precision": str(jax.config.jax_default_matmul_precision),
    **git_state(),
  }


def _cpu_snapshot() -> tuple[float, float, float]:
  """(wall s, busy CPU s of the whole host, CPU s of this process and its finished children)."""
  busy = float("nan")
  try:
    fields = [
      float(x) for x in Path("/proc/stat").read_text(encoding="utf-8").split("\n")[0].split()[1:]
    ]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # - idle, iowait
  except (OSError, ValueError, IndexError):
    pass
  own = os.times()
  return time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system


_START = _cpu_snapshot()


def contention() -> dict[str, float]:
  """CPU time other processes used while this script ran, from /proc/stat.

  Timings are only worth keeping when `foreign_share` (foreign CPU seconds / (wall x cores)) is
  near 0: another busy process on a 2-core machine halves every number.
  """
  wall, busy, own = (end - start for end, start in zip(_cpu_snapshot(), _START))
  foreign = max(busy - own, 0.0)
  return {
    "wall_s": wall,
    "host_busy_cpu_s": busy,
    "own_cpu_s": own,
    "foreign_cpu_s": foreign,
    "foreign_share": foreign / (wall * (os.cpu_count() or 1)),
  }


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  """Seconds per call; `compile_s` is tracing + compilation, measured apart from the runs."""

  median_s: float
  min_s: float
  max_s: float
  runs: int
  compile_s: float | None = None
  times_s: list[float] = dataclasses.field(default_factory=list)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def compile_timed(jitted, *args):
  """(compiled executable, compile seconds) of an already jitted function for these arguments."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def compile_jitted(fn: Callable, *args, **jit_kwargs):
  """(compiled executable, compile seconds) of `jax.jit(fn, **jit_kwargs)` for these arguments."""
  return compile_timed(jax.jit(fn, **jit_kwargs), *args)


def _timed(call: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - start


# A warm-up call longer than this counts as the first timed run (see `time_calls`).
LONG_CALL_S = 10.0


def time_calls(
  call: Callable[[], Any],
  *,
  runs: int = MIN_RUNS,
  warmup: int = 1,
  compile_s: float | None = None,
  min_total_s: float = 1.0,
  long_call_s: float = LONG_CALL_S,
) -> Timing:
  """Times `call()` (which returns device arrays) after `warmup` untimed calls.

  Every call is synchronised with `jax.block_until_ready` before the clock stops. A stateful
  call (a train step feeding its new state to the next) keeps its state in a closure.
  At least `runs` calls are timed, and more until the timed calls add up to `min_total_s` (at
  most MAX_RUNS), so millisecond medians are not a handful of noisy samples. The count follows
  the timed calls themselves, not the warm-up, whose first-touch costs would make it too small.
  A last warm-up call longer than `long_call_s` counts as the first timed run: one-time costs are
  then a negligible part of it, and a second untimed 30-second call would only lengthen the suite.
  """
  times = []
  for index in range(warmup):
    first_s = _timed(call)
    if index == warmup - 1 and first_s > long_call_s:
      times.append(first_s)
  while len(times) < runs or (sum(times) < min_total_s and len(times) < MAX_RUNS):
    times.append(_timed(call))
  return Timing(statistics.median(times), min(times), max(times), len(times), compile_s, times)


def time_in_turns(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
  """Seconds of each call per round, the calls taking turns (one call each per round, in order),
  so a slow phase of a shared machine hits all of them alike: paired comparisons."""
  seconds = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      seconds[name].append(_timed(call))
  return seconds


def time_jitted(
  fn: Callable, *args, runs: int = MIN_RUNS, warmup: int = 1, min_total_s: float = 1.0, **jit_kwargs
):
  """Compiles `fn` for `args` (timed apart), then times the compiled call on the same args.

  Returns (Timing, compiled). Donated arguments cannot be reused; time a step that donates its
  state with `time_stateful_step`.
  """
  compiled, compile_s = compile_jitted(fn, *args, **jit_kwargs)
  timing = time_calls(
    lambda: compiled(*args), runs=runs, warmup=warmup, compile_s=compile_s, min_total_s=min_total_s
  )
  return timing, compiled


def time_stateful_step(
  compiled, state, *args, runs: int = MIN_RUNS, compile_s: float | None = None
) -> Timing:
  """Times `compiled(state, *args) -> (state, metrics)`, each call fed the state of the last.

  For train steps that donate their state (the old one is consumed, so it cannot be passed
  twice). The first call also pays one-time costs (first-touch allocation of the donated
  buffers): it is never one of the timed runs, however long it takes.
  """
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], *args)
    return metrics

  return time_calls(call, runs=runs, compile_s=compile_s, long_call_s=float("inf"))


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's static estimate of the executable's memory: arguments + outputs + temporaries.

  `peak_bytes` = argument + output + temp - alias (donated inputs reused as outputs): the buffer
  assignment's total, a close upper bound of the executable's real peak. It is a property of
  the one program, reported the same way on every backend.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return None
  if stats is None:
    return None
  sizes = {
    name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
    for name in ("argument", "output", "temp", "alias", "generated_code")
  }
  sizes["peak_bytes"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
  return sizes


def compiled_flops(compiled) -> float | None:
  """XLA's own FLOP count of the executable (every op, elementwise included), as a cross-check
  of the hand-counted model FLOPs; None where the backend does not report it."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return None if not analysis or "flops" not in analysis else float(analysis["flops"])


def process_peak_bytes() -> int | None:
  """The device allocator's peak since this process started (GPU/TPU); None where not reported
  (CPU). It is the maximum over everything the process ran so far (the large matmul of
  `matmul_peak` included) and is never reset, so it is not any one call's memory: per call, use
  `compiled_memory`."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s and MFU
# ---------------------------------------------------------------------------------------------


def matmul_peak(dtype=jnp.float32, n: int | None = None, runs: int = MIN_RUNS) -> dict[str, Any]:
  """The device's achievable matmul rate: the median over `runs` of one [n, n] x [n, n] product.

  This measured rate, not a datasheet figure, is the denominator of every MFU reported here, so
  MFU says how close a step comes to the fastest matmul this software stack runs on this device.
  """
  if n is None:
    n = 4096 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  timing, _ = time_jitted(jnp.matmul, a, b, runs=runs)
  flops = 2.0 * n**3
  return {
    "dtype": jnp.dtype(dtype).name,
    "n": n,
    "flops": flops,
    "flop_per_s": flops / timing.median_s,
    "best_flop_per_s": flops / timing.min_s,
    "timing": timing.as_dict(),
  }


def matmul_peaks(quick: bool = False) -> dict[str, dict[str, Any]]:
  """f32 everywhere, plus bf16 on accelerators (where it is the training dtype)."""
  n = None
  if quick:
    n = 1024 if jax.default_backend() == "cpu" else 4096
  peaks = {"float32": matmul_peak(jnp.float32, n)}
  if jax.default_backend() != "cpu":
    peaks["bfloat16"] = matmul_peak(jnp.bfloat16, n)
  return peaks


def mfu(flops_per_call: float, seconds_per_call: float, peak_flop_per_s: float) -> float:
  """Model FLOP utilisation: the model's counted FLOP/s as a fraction of the measured peak."""
  return flops_per_call / seconds_per_call / peak_flop_per_s


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def result_path(name: str, preset: str, out: Path = RESULTS_DIR) -> Path:
  """benchmarks/results/<name>_<device>.json; the quick preset writes <name>_<device>_quick.json
  so a smoke check never overwrites the committed full results."""
  suffix = "" if preset == "full" else f"_{preset}"
  return Path(out) / f"{name}_{device_slug()}{suffix}.json"


def write_json(
  name: str, preset: str, payload: dict[str, Any], out: Path = RESULTS_DIR, quiet: bool = False
) -> Path:
  """Writes the result atomically (a temporary file renamed over the old one): a run stopped
  mid-write leaves the previous file whole. `quiet` skips the messages (for partial saves)."""
  path = result_path(name, preset, out)
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {
    "benchmark": name,
    "preset": preset,
    "environment": environment(),
    "contention": contention(),
    **payload,
  }
  if record["contention"]["foreign_share"] > 0.05 and not quiet:
    print(
      f"WARNING: other processes used {record['contention']['foreign_share']:.0%} of the "
      "CPU during this run; its timings are not trustworthy"
    )
  partial = path.with_name(path.name + ".partial")
  partial.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n", encoding="utf-8")
  os.replace(partial, path)
  if not quiet:
    print(f"wrote {path}")
  return path


def write_and_plot(
  name: str, preset: str, payload: dict[str, Any], out: Path = RESULTS_DIR
) -> Path:
  """`write_json`, then redraws the result's PNG from that JSON (where plot.py has a plotter for
  it), so the committed picture always shows the committed numbers."""
  path = write_json(name, preset, payload, out)
  from benchmarks import plot  # matplotlib is loaded only once the numbers are safe on disk

  plot.plot_file(path)
  return path


def _jsonable(value):
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if hasattr(value, "item"):
    return value.item()
  return str(value)


def human(value: float, unit: str = "") -> str:
  """1.23e9 -> '1.23 G'; for log lines."""
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"
