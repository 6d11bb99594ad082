"""The workdir lock: one holder at a time, named to the next; a finished holder leaves nothing to
take over, a dead one is taken over with a warning."""

import json
import socket
import subprocess
import sys

import pytest

from transformer.runs.lock import LOCK_FILENAME, WorkdirLock


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
  with (
    WorkdirLock(tmp_path, "training"),
    pytest.raises(ValueError, match=r"is in use by process \d+ on .*\(training"),
  ):
    WorkdirLock(tmp_path, "training")


def test_a_released_lock_is_taken_quietly(tmp_path, caplog):
  WorkdirLock(tmp_path, "training").release()
  assert (tmp_path / LOCK_FILENAME).read_text() == ""
  with caplog.at_level("WARNING"), WorkdirLock(tmp_path, "training"):
    pass
  assert "taking over" not in caplog.text


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
    check=True,
  )
  record = {"pid": int(dead.stdout), "host": socket.gethostname(), "purpose": "training"}
  (tmp_path / LOCK_FILENAME).write_text(json.dumps(record))
  with caplog.at_level("WARNING"), WorkdirLock(tmp_path, "training"):
    pass
  assert f"taking over the lock of process {record['pid']}" in caplog.text


@pytest.mark.parametrize("record", ["[1, 2]", "null", "7", "[" * 100_000])
def test_a_lock_record_that_is_not_an_object_is_taken_over(record, tmp_path):
  (tmp_path / LOCK_FILENAME).write_text(record)
  with WorkdirLock(tmp_path, "training"):
    assert json.loads((tmp_path / LOCK_FILENAME).read_text())["purpose"] == "training"
