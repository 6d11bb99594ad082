"""A signal while a command is still importing JAX: one line and 130, as at any later moment."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformer import startup

ROOT = Path(__file__).resolve().parents[2]


def _importing_jax(pid: int) -> bool:
  """Whether the process has mapped jaxlib's library: JAX's import has begun, and goes on for a
  good part of a second more (Flax after it)."""
  try:
    return "jaxlib" in Path(f"/proc/{pid}/maps").read_text()
  except OSError:
    return False


def _signal_while_importing(command: list[str], signum: int) -> subprocess.CompletedProcess:
  process = subprocess.Popen(
    command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 60
  while not _importing_jax(process.pid) and process.poll() is None:
    assert time.monotonic() < deadline, "the command never imported JAX"
    time.sleep(0.002)
  process.send_signal(signum)
  stdout, stderr = process.communicate(timeout=60)
  return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
@pytest.mark.parametrize(
  "command, signum",
  [
    ([sys.executable, "-m", "transformer.evaluate", "--workdir", "nowhere"], signal.SIGTERM),
    ([sys.executable, "-m", "transformer.translate", "--workdir", "nowhere"], signal.SIGINT),
    ([sys.executable, "train.py", "--config", "smoke", "--workdir", "nowhere"], signal.SIGTERM),
  ],
  ids=["evaluate-SIGTERM", "translate-SIGINT", "train-SIGTERM"],
)
def test_a_signal_during_the_imports_ends_the_command_with_one_line(command, signum):
  result = _signal_while_importing(command, signum)
  name = signal.Signals(signum).name
  assert result.returncode == 130, result.stderr
  assert result.stderr == f"stopped: {name} while the command was starting; nothing was written\n"
  assert result.stdout == ""


def test_a_program_importing_the_package_keeps_its_signal_handling():
  code = "import signal, transformer; print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert result.stdout.strip() == "True"


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["python", "-m", "transformer.train", "--config", "smoke"], True),
    (["python", "-X", "utf8", "-m", "transformer.translate"], True),
    (["python", "-mtransformer.evaluate"], True),
    (["python", str(ROOT / "train.py"), "--config", "smoke"], True),
    (["/venv/bin/python", "/venv/bin/transformer-sample", "--workdir", "x"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-m", "transformers_tool"], False),
    (["python", "-c", "import transformer"], False),
    (["python", "/elsewhere/train.py"], False),
    (["python"], False),
    ([], False),
  ],
)
def test_commands_are_told_from_programs_that_import_the_package(argv, expected):
  assert startup.is_command(argv) is expected


def test_signals_ignored_by_nohup_stay_ignored(monkeypatch):
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "transformer.train"])
  saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
  try:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    startup.stop_until_started()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is startup._stop
    assert signal.getsignal(signal.SIGINT) is startup._stop
  finally:
    for signum, handler in saved.items():
      signal.signal(signum, handler)
