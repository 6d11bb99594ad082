"""Faults: kill -9 mid-run, corrupted checkpoints, non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import smoke
from transformer.train.checkpoint import Checkpointer
from transformer.train.loop import Trainer, run

ROOT = Path(__file__).resolve().parents[2]


def last_losses(workdir: Path) -> dict[int, float]:
  """Train loss per step; a step logged twice (before a crash and after resuming) keeps the
  later value."""
  losses = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      losses[record["step"]] = record["train/loss"]
  return losses


def config_for(steps: int):
  config = smoke.get_config()
  config.update(num_train_steps=steps, checkpoint_every_steps=4)
  config.decode.bleu_at_end = False
  return config


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
  steps = 16
  run(config_for(steps), tmp_path / "reference")
  workdir = tmp_path / "killed"
  command = [sys.executable, "train.py", "--config", "configs/smoke.py", "--workdir",
             str(workdir), f"--config.num_train_steps={steps}",
             "--config.checkpoint_every_steps=4", "--config.decode.bleu_at_end=False"]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not (checkpoints.is_dir()
                                        and any(p.name == "8" for p in checkpoints.iterdir())):
    time.sleep(0.2)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  # The workdir stays readable: the newest complete checkpoint (8 or later) restores.
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  want, got = last_losses(tmp_path / "reference"), last_losses(workdir)
  assert sorted(got) == list(range(1, steps + 1))
  for step in range(1, steps + 1):
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def corrupt(step_dir: Path) -> None:
  """Truncates every data file of a checkpoint step, as a crash mid-copy might."""
  for path in step_dir.rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "d" in path.parent.name:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, caplog):
  config = config_for(8)
  run(config, tmp_path)
  trainer_state_dir = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in trainer_state_dir.iterdir() if p.name.isdigit()) == [4, 8]
  corrupt(trainer_state_dir / "8")
  trainer = Trainer(config, tmp_path)
  assert trainer.resumed_from == 4
  assert "checkpoint step 8" in caplog.text and "unreadable" in caplog.text
  trainer.checkpointer.close()


def test_non_finite_loss_stops_and_keeps_finite_state(tmp_path):
  config = config_for(8)
  config.optimizer.lr_scale = 1e12   # parameters blow up after the first update
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient within steps"):
    run(config, tmp_path)
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  trainer_config = config_for(8)
  trainer = Trainer(trainer_config, tmp_path)  # restores the saved state; must be finite
  for leaf in jax.tree.leaves(trainer.state.params):
    assert np.isfinite(np.asarray(leaf)).all()
  trainer.checkpointer.close()
  checkpointer.close()


def test_non_finite_loss_can_skip_updates(tmp_path):
  config = config_for(4)
  config.optimizer.lr_scale = 1e12
  config.nan_policy = "skip"
  results = run(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert sum(r.get("train/skipped_updates", 0) for r in records) >= 1
  assert results["step"] == 4


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path):
  command = [sys.executable, "train.py", "--config", "configs/smoke.py", "--workdir",
             str(tmp_path), "--config.num_train_steps=100000", "--config.checkpoint_every_steps=1000"]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists()
                                        and len(metrics.read_text().splitlines()) >= 5):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, stderr[-2000:]
  assert "stopped by SIGTERM" in stderr
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and 5 <= max(saved) < 1000
