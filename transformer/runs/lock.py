"""One writer per run directory: a lock file held for the life of the process that writes.

The lock is `flock` on WORKDIR/.lock, so the kernel releases it when its holder dies, however it
dies: a lock left by a killed run is simply taken over (and said so). The file records who holds
it, so a second writer is refused with a one-line error naming the first. On Linux NFS clients
`flock` is carried by the server's byte-range locks, so hosts sharing the workdir see each
other's lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import IO

from transformer.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILENAME = ".lock"


class WorkdirLock:
  """Holds WORKDIR/.lock until `release` (or the process's end)."""

  def __init__(self, workdir: str | Path, purpose: str):
    self.path = Path(workdir) / LOCK_FILENAME
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file: IO[str] | None = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115
    try:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(self._read())
      self._file.close()
      self._file = None
      raise UserError(
        f"{self.path.parent} is in use by {holder}: wait for it to finish, or use another --workdir"
      ) from None
    previous = self._read()
    if previous.get("pid") and not _alive(previous):
      log.warning("taking over the lock of %s, which is no longer running", _describe(previous))
    self._file.seek(0)
    self._file.truncate()
    json.dump(
      {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "purpose": purpose,
        "command": " ".join(sys.argv),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
      },
      self._file,
    )
    self._file.flush()

  def _read(self) -> dict:
    """The holder's record; {} for one that cannot be read (garbage, not a JSON object)."""
    try:
      with open(self.path, encoding="utf-8") as f:
        record = json.loads(f.read() or "{}")
    except (OSError, ValueError, RecursionError):
      return {}
    return record if isinstance(record, dict) else {}

  def release(self) -> None:
    """Clears the holder's record (a finished run leaves nothing to take over) and unlocks."""
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()
      self._file.flush()
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _alive(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return True  # another host's process: not ours to judge; the lock itself decided
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, KeyError):
    return True
  return True


def _describe(holder: dict) -> str:
  if not holder:
    return "another process"
  return (
    f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('purpose')}, "
    f"since {holder.get('since')}: {holder.get('command')})"
  )
