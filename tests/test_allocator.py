"""keep_freed_memory: a buffer freed and allocated again, as XLA:CPU does every step, is not
faulted in again (counted with getrusage's minor page faults, in a fresh process)."""

import os
import subprocess
import sys

import pytest

from transformer.allocator import keep_freed_memory

# A worker thread allocates, touches and frees a 64 MiB buffer 20 times; prints the minor page
# faults of the last 19 rounds. 64 MiB is 16,384 pages of 4 KiB.
SCRIPT = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "keep":
  from transformer.allocator import keep_freed_memory
  assert keep_freed_memory()
counts = []
def work():
  for _ in range(20):
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    buffer = np.ones(16 * 2**20, np.float32)
    del buffer
t = threading.Thread(target=work)
t.start(); t.join()
print(counts[-1] - counts[1])
"""


def faults(mode: str) -> int:
  # 4 KiB pages, as XLA's buffers get (NumPy asks for huge pages for large arrays).
  env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"}
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env
  ).stdout
  return int(out)


def test_a_freed_buffer_is_reused_without_page_faults():
  if not keep_freed_memory():
    pytest.skip("not glibc: malloc's options are not available")
  pages = 16 * 2**20 * 4 // 4096
  assert faults("default") > 10 * pages  # glibc's default hands the buffer back every round
  assert faults("keep") < pages // 4


def test_the_collector_is_frozen_in_a_command_and_left_alone_in_a_program():
  """A command freezes its imports' objects; a program calling the package (here, pytest's
  process) keeps its collector as it is."""
  import gc

  from transformer.allocator import freeze_imported_objects

  before = gc.get_freeze_count()
  freeze_imported_objects()
  assert gc.get_freeze_count() == before
  code = (
    "import gc, sys\n"
    "sys.orig_argv = [sys.executable, '-m', 'transformer.translate']\n"  # as a command starts
    "from transformer.allocator import freeze_imported_objects\n"
    "freeze_imported_objects()\n"
    "print(gc.get_freeze_count() > 10_000)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["True"]
