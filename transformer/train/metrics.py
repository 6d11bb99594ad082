"""Where training metrics go: TensorBoard event files, a JSONL log, and the progress bar."""

from __future__ import annotations

import json
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


class ThroughputWindow:
  """Target tokens per second since the last report."""

  def __init__(self):
    self.start, self.tokens = time.perf_counter(), 0

  def add(self, tokens: int) -> None:
    self.tokens += tokens

  def tokens_per_second(self) -> float:
    now = time.perf_counter()
    rate = self.tokens / max(now - self.start, 1e-9)
    self.start, self.tokens = now, 0
    return rate


def progress_bar(start: int, total: int) -> tqdm.tqdm:
  """Steps done, ETA, and the postfix the loop sets (loss, tokens/s)."""
  return tqdm.tqdm(initial=start, total=total, unit="step", dynamic_ncols=True, mininterval=1.0)
