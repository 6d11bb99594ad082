"""The life of a multi-host job, on two localhost processes of 4 CPU devices each (jax.distributed
with gloo): preparation done once by process 0, a preemption signal on one host that both obey
at the same step, and a resume that continues exactly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several multi-process training runs

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir: Path, steps: int, *extra: str, cache: Path, processes: int = 2):
  """`processes` train.py processes of one job (4 CPU devices each), started together."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    TRANSFORMER_CACHE_DIR=str(cache),
  )
  common = [
    "--config",
    "smoke",
    "--workdir",
    str(workdir),
    f"--config.num_train_steps={steps}",
    "--config.decode.bleu_at_end=False",
    "--config.checkpoint_every_steps=1000",
    "--config.eval_every_steps=1000",
  ]
  if processes > 1:
    common += [
      f"--config.parallel.coordinator_address=127.0.0.1:{port}",
      f"--config.parallel.num_processes={processes}",
    ]
  return [
    subprocess.Popen(
      [
        sys.executable,
        str(ROOT / "train.py"),
        *common,
        *extra,
        *([f"--config.parallel.process_id={i}"] if processes > 1 else []),
      ],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,  # a host's processes, to kill together
    )
    for i in range(processes)
  ]


def wait_all(procs, timeout: float = 300) -> list[tuple[int, str, str]]:
  outs = [p.communicate(timeout=timeout) for p in procs]
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def losses(workdir: Path) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      out[record["step"]] = record["train/loss"]
  return out


def saved_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_to_one_host_stops_both_at_one_step_and_they_resume_exactly(tmp_path):
  cache = tmp_path / "cache"
  run = tmp_path / "run"
  procs = start(run, 200, "--config.log_every_steps=1", cache=cache)
  deadline = time.time() + 240
  while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
    time.sleep(0.2)
  assert len(losses(run)) >= 3, "training did not start"
  procs[1].send_signal(signal.SIGTERM)  # the scheduler signals one host only
  signalled = time.time()
  results = wait_all(procs, timeout=120)
  assert time.time() - signalled < 60
  for code, _, err in results:
    assert code == 130, err[-3000:]
    assert "stopped: SIGTERM" in err.strip().splitlines()[-1]
  steps = saved_steps(run)
  assert len(steps) == 1  # one checkpoint, of one step, written by both processes together
  stopped_at = steps[0]
  assert 3 <= stopped_at < 200

  results = wait_all(start(run, stopped_at + 3, "--config.log_every_steps=1", cache=cache))
  assert all(code == 0 for code, _, _ in results), results[0][2][-3000:]
  reference = tmp_path / "reference"
  results = wait_all(start(reference, stopped_at + 3, "--config.log_every_steps=1", cache=cache))
  assert all(code == 0 for code, _, _ in results), results[0][2][-3000:]
  want, got = losses(reference), losses(run)
  for step in range(1, stopped_at + 4):
    assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_a_second_sigterm_during_the_save_leaves_a_readable_checkpoint(tmp_path):
  run = tmp_path / "run"
  (proc,) = start(run, 200, "--config.log_every_steps=1", cache=tmp_path / "cache", processes=1)
  deadline = time.time() + 240
  while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)
  ((code, _, err),) = wait_all([proc], timeout=120)
  assert code == 130, err[-3000:]
  (resumed,) = wait_all(start(run, saved_steps(run)[-1] + 1, cache=tmp_path / "cache", processes=1))
  assert resumed[0] == 0, resumed[2][-3000:]
  assert "resumed from step" in resumed[2]


def test_preparation_happens_once_and_a_failure_of_process_0_stops_process_1(tmp_path):
  cache, run = tmp_path / "cache", tmp_path / "run"
  results = wait_all(start(run, 2, "--config.log_every_steps=1", cache=cache))
  assert all(code == 0 for code, _, _ in results), results[0][2][-3000:]
  log_0, log_1 = results[0][2], results[1][2]
  assert "encoding the text" in log_0 and "encoding the text" not in log_1
  assert not [p for p in [*run.rglob("*"), *cache.rglob("*")] if ".tmp" in p.name]
  # Process 0 cannot read its data: process 1 stops with its one line instead of waiting.
  broken = start(
    tmp_path / "broken",
    2,
    f"--config.data.source_dir={tmp_path / 'absent'}",
    "--config.parallel.barrier_timeout_s=120",
    cache=cache,
  )
  began = time.time()
  results = wait_all(broken, timeout=180)
  assert time.time() - began < 120
  for code, _, err in results:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "absent" in lines[0], err[-3000:]
  assert "process 0 failed while preparing the data" in results[1][2]


def test_process_0_killed_while_preparing_stops_process_1_with_one_line(tmp_path):
  cache = tmp_path / "cache"
  procs = start(tmp_path / "run", 2, "--config.parallel.barrier_timeout_s=120", cache=cache)
  deadline = time.time() + 120
  while time.time() < deadline and not (cache.exists() and any(cache.rglob("*"))):
    time.sleep(0.05)
  assert procs[0].poll() is None, "process 0 ended before its preparation could be cut"
  os.killpg(procs[0].pid, signal.SIGKILL)  # its host goes down: every process of it at once
  killed = time.time()
  _, (code, _, err) = wait_all(procs, timeout=120)
  assert time.time() - killed < 30
  lines = err.strip().splitlines()
  assert code == 2, err[-3000:]
  assert lines[-1].startswith("error: lost the job's coordinator: process 0 stopped"), err[-3000:]
  assert not any(line.startswith("error: ") for line in lines[:-1])
  for trace in ("Check failure", "Fatal Python error", "Traceback", "F1"):
    assert trace not in err
