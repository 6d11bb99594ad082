"""Where training metrics go: TensorBoard event files, a JSONL log, and the progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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
    self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

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


def process_age_s() -> float:
  """Seconds since this process started (Linux: from /proc), for start-up times that include
  the interpreter and the imports; elsewhere, since this module was imported."""
  try:
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


class ThroughputWindow:
  """Target tokens per second since the last report, and the share of that time the loop spent
  waiting for the input stream."""

  def __init__(self):
    self.start, self.tokens, self.waited = time.perf_counter(), 0, 0.0

  def add(self, tokens: int, waited_s: float = 0.0) -> None:
    self.tokens += tokens
    self.waited += waited_s

  def report(self) -> tuple[float, float]:
    """(tokens per second, share of the time waiting for data) since the last report."""
    now = time.perf_counter()
    elapsed = max(now - self.start, 1e-9)
    rate, waiting = self.tokens / elapsed, self.waited / elapsed
    self.start, self.tokens, self.waited = now, 0, 0.0
    return rate, waiting


def progress_bar(start: int, total: int) -> tqdm.tqdm:
  """Steps done, ETA, and the postfix the loop sets (loss, tokens/s)."""
  return tqdm.tqdm(initial=start, total=total, unit="step", dynamic_ncols=True, mininterval=1.0)
