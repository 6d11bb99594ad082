"""Each host's process of a multi-host job runs under a small supervisor process.

When the job's coordinator (process 0, which hosts JAX's coordination service) dies outright
(SIGKILL, a host gone), JAX's client in every other process terminates that process from a C++
thread: an absl fatal log, a C++ stack, Python's fault dump and SIGABRT, before Python can do
anything (a Python callback for the lost peer cannot even be called: jaxlib passes it an
`absl::Status` it cannot convert). So the work runs in a child process whose stderr passes
through here: this process recognises that ending and says it in one line, exit status 2.

Everything else passes through unchanged: output as it comes, the child's exit status (or its
signal, raised again here), SIGTERM and SIGHUP sent to this process (the scheduler's
preemption notice reaches the training loop). A terminal's Ctrl-C reaches both processes, as it
does every process of a pipeline, so it is not forwarded twice. If this process is killed the
child gets SIGTERM (Linux), and stops as a preempted run does: it saves and exits.

Imports nothing heavy: it runs before JAX is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time

# In the child's environment: "PID:FD", the supervisor's pid and the pipe on which the child
# says that every process of the job has joined. A pipe, not a signal: Python runs pending
# signal handlers in signal-number order, so a SIGHUP arriving just after a joining SIGUSR1
# would be handled first, as if the child had not joined; a byte in a pipe is there to be seen.
SUPERVISED = "TRANSFORMER_SUPERVISED"
JOB_ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")

# An absl/glog line, C++ or Python: "E1207 03:17:59.355655    3045 file.cc:289] message".
_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ ([\w.]+):\d+\] ")
# The sources of the lines that announce a lost coordination service, before the fatal one.
_COORDINATION_SOURCES = {
  b"preemption_sync_manager.cc",
  b"coordination_service_agent.cc",
  b"coordination_service.cc",
  b"client.h",
  b"client.cc",
}
# The coordination service names the processes it lost: "... (stopped sending heartbeats):\n1\n".
_UNHEALTHY = re.compile(rb"stopped sending heartbeats\):\s*\n([\d\s,]+?)\n\S")
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)
_RELEASE_AFTER_S = 2.0  # held lines that no abort follows within this time are printed


def joins_a_job(coordinator_address: str, num_processes: int) -> bool:
  """Whether `jax.distributed` will join several processes: the config names a coordinator for
  more than one, or the environment is a cluster's (as `distributed.initialize` reads it)."""
  if coordinator_address:
    return num_processes != 1
  return any(os.environ.get(name) for name in JOB_ENVIRONMENT)


def _supervisor() -> tuple[str, str]:
  """(pid, pipe's fd) as this process's environment names them; empty strings where it names
  none."""
  pid, _, fd = os.environ.get(SUPERVISED, "").partition(":")
  return pid, fd


def is_supervised() -> bool:
  """Whether this process runs under a supervisor (its environment names its parent's pid)."""
  return _supervisor()[0] == str(os.getppid())


def report_joined() -> None:
  """In a supervised child: tells the supervisor that the job's processes have all joined.
  Until then the child waits inside JAX's connect, which no signal interrupts: a SIGTERM or
  Ctrl-C then ends it from the supervisor (it has written nothing yet)."""
  fd = _supervisor()[1]
  if is_supervised() and fd.isdigit():
    # OSError: the supervisor gone (its death signal follows), or the pipe already reported.
    with contextlib.suppress(OSError):
      os.write(int(fd), b"j")
      os.close(int(fd))


def supervise(command: list[str]) -> int:
  """Runs `command` (this one's, as `python -m ...`) as a supervised child and returns its exit
  status (or exits with its signal); a child ended by a lost coordination service is one
  `error:` line and 2, one stopped by a signal before its job's processes joined is one
  `stopped:` line and 130."""
  stopped = [0]
  started: list[subprocess.Popen] = []
  joined, joined_w = os.pipe()

  def stop(signum, frame):
    del frame
    # Readable: the child has joined (or has ended, when forwarding is harmless as well).
    if not started or not select.select([joined], [], [], 0)[0]:  # in JAX's connect: no output
      stopped[0] = signum
      for child in started:
        child.kill()
    elif signum != signal.SIGINT:  # a Ctrl-C reached the child itself
      started[0].send_signal(signum)

  # Handlers, not SIG_IGN: the child starts with the default dispositions (exec resets handled
  # signals; an ignored SIGINT would stay ignored there). Set before the child starts: the
  # default action would end this process and leave the child running unsupervised.
  previous = {s: signal.getsignal(s) for s in (*_FORWARDED, signal.SIGINT)}
  signal.signal(signal.SIGINT, lambda signum, frame: None)
  try:
    for signum in (*_FORWARDED, signal.SIGINT):
      if previous[signum] != signal.SIG_IGN:
        signal.signal(signum, stop)
    try:
      child = subprocess.Popen(
        [sys.executable, *command],
        env={**os.environ, SUPERVISED: f"{os.getpid()}:{joined_w}"},
        stderr=subprocess.PIPE,
        pass_fds=(joined_w,),
      )
    finally:
      os.close(joined_w)
    started.append(child)
    if stopped[0]:  # a signal while it started
      child.kill()
    assert child.stderr is not None
    held = _pass_through(child.stderr.fileno())
    code = child.wait()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    os.close(joined)
  if stopped[0]:
    name = signal.Signals(stopped[0]).name
    print(
      f"stopped: {name} while waiting for the job's other processes to join; nothing was written",
      file=sys.stderr,
      flush=True,
    )
    return 130
  # SIGABRT, or SIGSEGV where Python's fault dump crashes on the aborting threads.
  if code < 0 and _coordination_abort(held):
    print(f"error: {_lost_peer_message(held)}", file=sys.stderr, flush=True)
    return 2
  _write(held)
  if code < 0:  # the child's signal is this process's too (a shell reports 128+N either way)
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
  return code


def stop_with_supervisor() -> None:
  """In the child: SIGTERM when the supervisor dies (Linux's parent-death signal), so a killed
  supervisor does not leave a job running unseen. The training loop treats it as preemption."""
  with contextlib.suppress(OSError, AttributeError):
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _pass_through(fd: int) -> list[bytes]:
  """Copies the child's stderr to this process's as lines come, until it closes. From a line
  of the coordination client on (the announcement of a lost service), lines are held back
  until `_RELEASE_AFTER_S` passes without the child ending; returns what is held at the end."""
  pending, held_since = b"", None
  held: list[bytes] = []
  while True:
    ready, _, _ = select.select([fd], [], [], 0.2 if held_since is not None else None)
    if held_since is not None and time.monotonic() - held_since > _RELEASE_AFTER_S:
      _write(held)
      held, held_since = [], None
    if not ready:
      continue
    chunk = os.read(fd, 65536)
    if not chunk:
      return [*held, pending] if pending else held
    *lines, pending = (pending + chunk).split(b"\n")
    for line in lines:
      match = _LOG_LINE.match(line)
      if held_since is None and match and match.group(1) in _COORDINATION_SOURCES:
        held_since = time.monotonic()
      if held_since is None:
        _write([line + b"\n"])
      else:
        held.append(line + b"\n")


def _coordination_abort(held: list[bytes]) -> bool:
  """The child's last words are JAX's client terminating it for the coordination service."""
  return any(
    line.startswith(b"F") and b"JAX distributed service detected fatal errors" in line
    for line in held
  )


def _lost_peer_message(held: list[bytes]) -> str:
  text = b"".join(held)
  if b"DEADLINE_EXCEEDED" in text and b"RegisterTask" in text:
    return (
      "the job's processes did not all join within JAX's start-up timeout: start every one of "
      "parallel.num_processes, each with the same parallel.coordinator_address (that of "
      "process 0's host)"
    )
  if b"Failed to send RPC to coordination service" in text:
    cause = "lost the job's coordinator: process 0 stopped without a word"
  elif found := _UNHEALTHY.search(text):
    ids = found.group(1).decode().replace(",", " ").split()
    cause = (
      f"process{'es' if len(ids) > 1 else ''} {', '.join(ids)} of the job stopped without a word"
    )
  else:
    cause = "another process of the job stopped without a word"
  return (
    f"{cause} (killed, or its host went down), and JAX stopped this one: restart the job on "
    "every host to resume from its last checkpoint (that process's log may say why it stopped)"
  )


def _write(lines: list[bytes]) -> None:
  with contextlib.suppress(OSError):  # stderr gone: the child's status still counts
    sys.stderr.buffer.write(b"".join(lines))
    sys.stderr.buffer.flush()
