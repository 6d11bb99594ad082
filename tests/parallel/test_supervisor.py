"""The supervisor around each host's process of a multi-host job (parallel/supervisor.py), with
stand-in children: output and exit status pass through, a signal to the supervisor reaches the
child, and JAX's abort for a lost coordination service becomes one line and exit status 2."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from transformer.parallel.supervisor import joins_a_job

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "jax_abort"

# What jaxlib 0.10's client printed in process 1 when process 0 was killed (abridged).
LOST_COORDINATOR = (FIXTURES / "lost_coordinator.txt").read_text()


def supervised(child: str, **kwargs) -> subprocess.Popen:
  """A supervisor process (as `train.py` starts one) around a Python child running `child`."""
  code = (
    "import sys; from transformer.parallel.supervisor import supervise; "
    f"sys.exit(supervise(['-c', {child!r}]))"
  )
  return subprocess.Popen(
    [sys.executable, "-c", code],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


def test_output_and_exit_status_pass_through():
  child = "import sys; print('out'); print('log line', file=sys.stderr); sys.exit(3)"
  out, err = supervised(child).communicate(timeout=60)
  assert out == "out\n" and err == "log line\n"
  process = supervised(child)
  process.communicate(timeout=60)
  assert process.returncode == 3


def aborting_after(text: str) -> str:
  """A stand-in child that writes `text` (jaxlib's recorded output) to stderr and aborts."""
  return f"import os, sys; sys.stderr.write({text!r}); sys.stderr.flush(); os.abort()"


def one_abort_line(text: str) -> str:
  """What the supervisor prints for a child aborting after `text`: exit 2 and one line."""
  process = supervised(aborting_after(text))
  _, err = process.communicate(timeout=60)
  assert process.returncode == 2
  assert len(err.splitlines()) == 1, err
  return err


def test_a_lost_coordinator_is_one_line_and_exit_2():
  child = aborting_after(LOST_COORDINATOR)
  process = supervised(f"import sys; print('before', file=sys.stderr); {child}")
  _, err = process.communicate(timeout=60)
  assert process.returncode == 2
  lines = err.splitlines()
  assert lines[0] == "before" and len(lines) == 2, err
  assert lines[1].startswith("error: lost the job's coordinator: process 0 stopped")


# What process 0 printed when process 1 was killed during training (abridged).
LOST_PROCESS_1 = (FIXTURES / "lost_process_1.txt").read_text()


def test_a_lost_process_is_named():
  err = one_abort_line(LOST_PROCESS_1)
  assert err.startswith("error: process 1 of the job stopped without a word"), err


def test_processes_that_never_joined_are_named_as_such():
  err = one_abort_line((FIXTURES / "never_joined.txt").read_text())
  assert err.startswith("error: the job's processes did not all join within"), err


def test_other_aborts_keep_their_output_and_signal():
  child = (
    "import os, sys; sys.stderr.write('F1207 03:17:59.355900 1 other.cc:1] boom\\n'); os.abort()"
  )
  process = supervised(child)
  _, err = process.communicate(timeout=60)
  assert process.returncode == -signal.SIGABRT
  assert "boom" in err and "error:" not in err


def test_coordination_warnings_without_an_abort_are_printed():
  warning = LOST_COORDINATOR.splitlines()[0]
  child = f"import sys, time; print({warning!r}, file=sys.stderr, flush=True); time.sleep(3)"
  process = supervised(child)
  _, err = process.communicate(timeout=60)
  assert process.returncode == 0 and err == warning + "\n"


# A child that has joined its job and reports each signal it gets (imports no JAX).
JOINED_CHILD = textwrap.dedent("""\
  import os, signal, sys, time
  from transformer.parallel.supervisor import report_joined
  signal.signal(signal.SIGTERM, lambda s, f: sys.exit(f"child got {signal.Signals(s).name}"))
  signal.signal(signal.SIGHUP, lambda s, f: sys.exit(f"child got {signal.Signals(s).name}"))
  report_joined()
  """)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_supervisor_reaches_the_child(signum):
  process = supervised(JOINED_CHILD + "print('ready', flush=True)\ntime.sleep(60)\n")
  assert process.stdout.readline() == "ready\n"
  process.send_signal(signum)
  began = time.monotonic()
  _, err = process.communicate(timeout=60)
  assert time.monotonic() - began < 10
  assert process.returncode == 1 and err == f"child got {signum.name}\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_right_after_joining_reaches_the_child(signum):
  """The signal lands while the supervisor may not yet have run any Python since the child
  joined (the preemption notice of a job that has just started)."""
  child = JOINED_CHILD + f"os.kill(os.getppid(), {int(signum)})\ntime.sleep(60)\n"
  for _ in range(5):
    process = supervised(child)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and err == f"child got {signum.name}\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_the_job_has_joined_stops_the_waiting_child(signum):
  """Until every process has joined, the child waits inside JAX's connect, where no signal
  reaches Python (a SIGTERM waited out the 5-minute timeout): the supervisor ends it."""
  child = "import time; print('waiting to join', flush=True); time.sleep(60)"
  process = supervised(child)
  assert process.stdout.readline() == "waiting to join\n"
  process.send_signal(signum)
  began = time.monotonic()
  _, err = process.communicate(timeout=60)
  assert time.monotonic() - began < 10
  assert process.returncode == 130
  assert err == (
    f"stopped: {signum.name} while waiting for the job's other processes to join; nothing was "
    "written\n"
  )


def test_the_child_stops_when_the_supervisor_is_killed(tmp_path):
  marker = tmp_path / "stopped"
  child = textwrap.dedent(f"""\
    import signal, sys, time
    from transformer.parallel.supervisor import stop_with_supervisor
    stop_with_supervisor()
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(open({str(marker)!r}, "w").close()))
    print("ready", flush=True)
    time.sleep(60)
    """)
  process = supervised(child)
  assert process.stdout.readline() == "ready\n"
  process.kill()
  process.wait(timeout=10)
  deadline = time.monotonic() + 20
  while not marker.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert marker.exists()


def test_which_commands_join_a_job(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert joins_a_job("127.0.0.1:1234", 2)
  assert not joins_a_job("127.0.0.1:1234", 1)
  assert not joins_a_job("", 0)
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  assert joins_a_job("", 0)
