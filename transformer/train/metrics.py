"""Where training metrics go: TensorBoard event files, a JSONL log, and a progress bar on a
terminal."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import tqdm


class MetricWriter:
  """Writes scalars to `workdir/tensorboard` and appends them to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: Path, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
    # Open for the run's life and flushed after every line; closed by `close`.
    path = workdir / "metrics.jsonl"
    self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
    if self.jsonl.tell() and not _ends_a_line(path):
      # A line cut short by a crash or a full disk: the resumed run's first record would
      # continue it, and both would be lost to every reader.
      self.jsonl.write("\n")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()
      self.jsonl.close()


def _ends_a_line(path: Path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def process_age_s() -> float:
  """Seconds since this process started (Linux: from /proc), for start-up times that include
  the interpreter and the imports; elsewhere, since this module was imported."""
  try:
    start_ticks = int(
      Path("/proc/self/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[19]
    )
    uptime_s = float(Path("/proc/uptime").read_text(encoding="utf-8").split()[0])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


class Progress:
  """A tqdm bar (steps, ETA, loss and tokens/s) when stderr is a terminal; nothing otherwise, so
  a log redirected to a file holds only the plain lines, with no carriage returns."""

  def __init__(self, start: int, total: int, *, enabled: bool = True):
    self.bar = None
    if enabled and sys.stderr is not None and sys.stderr.isatty():
      self.bar = tqdm.tqdm(
        initial=start, total=total, unit="step", dynamic_ncols=True, mininterval=1.0
      )

  def update(self, steps: int) -> None:
    if self.bar is not None:
      self.bar.update(steps)

  def set_postfix(self, **values: str) -> None:
    if self.bar is not None:
      self.bar.set_postfix(**values)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def host_sums(pending: list[dict[str, jax.Array]]) -> dict[str, np.ndarray | np.generic]:
  """The steps' metrics fetched once and added on the host: adding them on the device would
  dispatch one small computation per metric and step (a noticeable share of a small model's
  step on a CPU)."""
  return functools.reduce(lambda a, b: jax.tree.map(np.add, a, b), jax.device_get(pending))
