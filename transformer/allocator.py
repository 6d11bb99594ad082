"""Keeping freed memory in the process: XLA:CPU's temporary buffers without page faults.

XLA:CPU allocates each execution's temporary buffers anew and frees them after it. Glibc's malloc
serves a block above 32 MiB with a fresh mmap and unmaps it on free, returns a freed heap top
above 128 KiB to the kernel, and gives each thread pool's threads heaps of their own that are
unmapped as soon as they empty; so every step faulted its buffers' pages in again, zeroed by the
kernel. Measured with /usr/bin/time: the default recipe took 151 million minor page faults and
540 s of system time in a 1,969 CPU-second run; the shakespeare_char step spent 38 of its 136 ms
in the kernel. Served from one heap that is never trimmed, the pages stay mapped and each step
reuses them. The cost: the process keeps its peak heap instead of handing freed memory back, as a
caching allocator (PyTorch's, XLA's on GPUs) does, and its threads share one arena's lock.

A second cost, measured but not yet removed: a process that compiled its train step leaves the
compiler's freed memory in that one heap between blocks that stay alive, and the ~1,650 scratch
blocks XLA:CPU's kernels take and free at every shakespeare_char step then walk glibc's lists of
free sizes (`_int_malloc` 4.4% of the step against 0.4% in a process that read the step from the
persistent cache; 44.8-45.2 against 42.0-43.0 ms a step). Per-thread arenas avoid the walk there,
but a thread's heap cannot hold a block above 64 MiB, which is then mapped and unmapped at every
call: the default recipe took 6.7 million minor faults and 350 against 270 ms a step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

from transformer.startup import is_command

log = logging.getLogger(__name__)

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_TRIM_NEVER = 2**31 - 1  # the largest value mallopt takes: heap tops up to 2 GiB are kept


def keep_freed_memory() -> bool:
  """Tells glibc's malloc to serve every block from one heap (one arena) and never trim it; False
  where the C library is not glibc (nothing changes there). Called before the first JAX
  computation, so the threads XLA starts take the one arena."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  done = all(
    mallopt(option, value)
    for option, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _TRIM_NEVER))
  )
  if not done:
    log.debug("mallopt refused: freed memory goes back to the kernel as before")
  return done


def freeze_imported_objects() -> None:
  """In a command's process: collects once, then leaves every object alive now out of Python's
  later collections (`gc.freeze`): a command's imports (JAX, Flax, Orbax, Grain) leave ~160,000
  objects that live as long as the process, and each full collection walked all of them again:
  35-55 ms apiece, 0.45 CPU s of a shakespeare_char run's first 20 steps (0.14 s frozen). A
  program calling the package keeps its collector as it is: frozen objects it dropped later
  would never be collected."""
  if not is_command(getattr(sys, "orig_argv", [])):
    return
  gc.collect()
  gc.freeze()
