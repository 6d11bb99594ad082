"""Keeping freed memory in the process: XLA:CPU's temporary buffers without page faults.

XLA:CPU allocates each execution's temporary buffers anew (the `shakespeare_char` step's are one
52 MB block) and frees them after it. Glibc's malloc serves a block above 32 MiB with a fresh
mmap and unmaps it on free, and returns a freed heap top above 128 KiB to the kernel, so every
step faulted in ~12,700 zeroed pages again: a quarter of that step's CPU time was the kernel's
(38 of 136 ms, pinned to one core). Served from the heap and never trimmed, the pages stay mapped
and a step reuses them. The cost: the process keeps its peak heap instead of handing freed memory
back, as a caching allocator (PyTorch's, XLA's on GPUs) does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # the largest value mallopt takes: heap tops up to 2 GiB are kept


def keep_freed_memory() -> bool:
  """Tells glibc's malloc to serve every block from the heap and never trim it; False where the
  C library is not glibc (nothing changes there)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER))
  if not done:
    log.debug("mallopt refused: freed memory goes back to the kernel as before")
  return done
