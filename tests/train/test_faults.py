"""Faults: kill -9 mid-run, corrupted checkpoints, non-finite losses."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.config import Config
from transformer.configs import smoke
from transformer.errors import UserError
from transformer.parallel.strategies import TrainStep
from transformer.runs.checkpoint import Checkpointer, CheckpointError, Record, average_params
from transformer.runs.loading import warm_start_params
from transformer.train.loop import run, train
from transformer.train.metrics import MetricWriter
from transformer.train.setup import opened

pytestmark = pytest.mark.slow  # each runs training end to end, some in subprocesses

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
  command = [
    sys.executable,
    "train.py",
    "--config",
    "smoke",
    "--workdir",
    str(workdir),
    f"--config.num_train_steps={steps}",
    "--config.checkpoint_every_steps=4",
    "--config.decode.bleu_at_end=False",
  ]
  process = subprocess.Popen(
    command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not (
    checkpoints.is_dir() and any(p.name == "8" for p in checkpoints.iterdir())
  ):
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


def saved_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def numpy_params(state) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_corrupted_checkpoint_falls_back_and_is_written_again(tmp_path, caplog):
  """Step 8 corrupted: resume from 4, write 8 again (the same as the lost one, since resuming is
  exact) and average over it at the end."""
  run(config_for(8), tmp_path)
  assert saved_steps(tmp_path) == [4, 8]
  with opened(Config.of(config_for(8)), tmp_path) as (_, state):
    params_8 = numpy_params(state)  # the intact step 8, the reference
  corrupt(tmp_path / "checkpoints" / "8")

  config = config_for(12)
  config.average_last_checkpoints = 3
  with opened(Config.of(config), tmp_path) as (job, _):
    assert job.resumed_from == 4
    assert "checkpoint step 8" in caplog.text and "damaged" in caplog.text
    assert job.checkpointer.steps() == [4]  # the damaged step is gone, the readable kept
  assert run(config, tmp_path)["step"] == 12  # averages steps 4, 8 and 12
  assert saved_steps(tmp_path) == [4, 8, 12]

  with opened(Config.of(config), tmp_path) as (job, state):
    abstract = job.abstract_state(state)
    states = {step: job.checkpointer.restore(abstract, step)[0] for step in (4, 8, 12)}
    for got, want in zip(numpy_params(states[8]), params_8):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # Averaging leaves out a step that became unreadable, with a warning, and averages the rest.
    corrupt(tmp_path / "checkpoints" / "4")
    averaged, steps = average_params(job.checkpointer, abstract, 3)
    assert steps == [8, 12] and "averaging leaves out checkpoint step 4" in caplog.text
    for got, a, b in zip(
      jax.tree.leaves(averaged), numpy_params(states[8]), numpy_params(states[12])
    ):
      np.testing.assert_allclose(np.asarray(got), (a + b) / 2, rtol=1e-6, atol=1e-7)

  # A config of another shape is named as such, not as corruption, and nothing is deleted.
  other = config_for(12)
  other.model.d_ff = 128
  with (
    pytest.raises(UserError, match=r"trained with model.d_ff=64, this command sets 128"),
    opened(Config.of(other), tmp_path),
  ):
    pass
  assert saved_steps(tmp_path) == [4, 8, 12]
  # Allowed on purpose, the checkpoint is still read as another model's, and refused so.
  other.allow_config_change = ("model.d_ff",)
  with (
    pytest.raises(
      CheckpointError,
      match=r"checkpoint at .*/12 was written with another "
      r"model/optimizer config \(.*feed_forward.* saved \(64,\), now \(128,\)",
    ),
    opened(Config.of(other), tmp_path),
  ):
    pass
  assert saved_steps(tmp_path) == [4, 8, 12]


def test_crash_in_the_first_step_leaves_no_checkpoint(tmp_path):
  """Nothing trained, nothing saved: a fixed config (here another d_ff) then starts afresh."""

  def out_of_memory(state, batch, key):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  with opened(Config.of(config_for(4)), tmp_path) as (job, state):
    broken = dataclasses.replace(job, train_step=TrainStep(out_of_memory, job.train_step.key))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
      train(broken, state, MetricWriter(tmp_path, enabled=False))
  assert saved_steps(tmp_path) == []
  fixed = config_for(4)
  fixed.model.d_ff = 128
  with opened(Config.of(fixed), tmp_path) as (job, _):
    assert job.resumed_from is None


def test_init_from_skips_an_unfinished_save(tmp_path):
  """A save cut short leaves Orbax's "<step>.orbax-checkpoint-tmp-<time>" directory; the source
  run's newest complete step is used, and the other run's directory is left as it was."""
  source = tmp_path / "source"
  checkpointer = Checkpointer(source / "checkpoints", asynchronous=False)
  weights = np.arange(6, dtype=np.float32).reshape(2, 3)
  checkpointer.save(4, {"params": {"w": jnp.asarray(weights)}}, Record({}))
  checkpointer.close()
  unfinished = source / "checkpoints" / "8.orbax-checkpoint-tmp-1700000000"
  (unfinished / "state").mkdir(parents=True)
  params, _, where = warm_start_params(source)
  np.testing.assert_array_equal(params["w"], weights)
  assert where == f"checkpoint 4 of {source}"
  assert unfinished.is_dir()


def test_non_finite_loss_stops_and_keeps_finite_state(tmp_path):
  config = config_for(8)
  config.optimizer.lr_scale = 1e12  # parameters blow up after the first update
  with pytest.raises(UserError, match="non-finite loss or gradient within steps"):
    run(config, tmp_path)
  with opened(Config.of(config_for(8)), tmp_path) as (_, state):  # restores the saved state
    for leaf in jax.tree.leaves(state.params):
      assert np.isfinite(np.asarray(leaf)).all()


def test_non_finite_loss_can_skip_updates(tmp_path):
  config = config_for(4)
  config.optimizer.lr_scale = 1e12
  config.nan_policy = "skip"
  results = run(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert sum(r.get("train/skipped_updates", 0) for r in records) >= 1
  assert results["step"] == 4
  # The rate logged is the one Adam applied: its own count did not advance on skipped steps.
  applied = 0
  for record in (r for r in records if "train/learning_rate" in r):
    applied += 1 - record["train/skipped_updates"]
    update = max(applied, 1)  # a skipped first step: the rate of Adam's first update
    want = 1e12 * 32**-0.5 * min(update**-0.5, update * 10**-1.5)
    assert record["train/learning_rate"] == pytest.approx(want, rel=1e-6), record["step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_saves_a_checkpoint_and_exits_130(signum, tmp_path):
  """SIGHUP (the terminal closed) as SIGTERM: it killed the run without a checkpoint."""
  command = [
    sys.executable,
    "train.py",
    "--config",
    "smoke",
    "--workdir",
    str(tmp_path),
    "--config.num_train_steps=100000",
    "--config.checkpoint_every_steps=1000",
  ]
  process = subprocess.Popen(
    command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  try:
    while time.time() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 5
    ):
      time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
  finally:  # a signal the run ignored (inherited SIG_IGN) must not leave 100,000 steps going
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 130, stderr[-2000:]
  name = signal.Signals(signum).name
  assert f"stopped: {name} at step" in stderr and "is saved, run the same command" in stderr
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and 5 <= max(saved) < 1000


def test_elapsed_time_continues_across_a_resume(tmp_path):
  """A run stopped after 4 steps and resumed to 8 by another process: the resumed process's
  time/elapsed_s counts on from what the first had spent (kept in the checkpoint), so the run's
  BLEU-against-time curve stays one curve."""
  command = [
    sys.executable,
    "train.py",
    "--config",
    "smoke",
    "--workdir",
    str(tmp_path),
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.decode.bleu_at_end=False",
    "--config.decode.validation_bleu=False",
  ]

  def elapsed() -> dict[int, float]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return {
      record["step"]: record["time/elapsed_s"]
      for record in map(json.loads, lines)
      if "time/elapsed_s" in record
    }

  for steps in (4, 8):
    subprocess.run(
      [*command, f"--config.num_train_steps={steps}"], cwd=ROOT, check=True, capture_output=True
    )
    if steps == 4:
      first = elapsed()
  second = {step: t for step, t in elapsed().items() if step > 4}
  assert sorted(first) == [2, 4] and sorted(second) == [6, 8]
  assert first[2] < first[4] < second[6] < second[8]
