"""JAX's persistent compilation cache under the project's cache folder: each program (a training
step, a decoding program of one shape) compiles once per machine, not once per process.

Compiling a decoding program takes seconds on a CPU, as long as translating a test set; with the
cache, the second `evaluate` or `translate` of a model's shapes starts at once. Turned on by the
commands (train, evaluate, translate); a library user calls `enable()`. Off with
TRANSFORMER_COMPILATION_CACHE=0; JAX_COMPILATION_CACHE_DIR, if set, is used (made if absent;
one that cannot be a folder is named in a warning and the cache left off).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from transformer.files import cache_root

log = logging.getLogger(__name__)

# Every program is kept, however fast it compiled (JAX's default keeps those over 1 s): a run's
# small ones (initialisers, the evaluation step, the schedule) compile in 0.02-0.4 s each, ~3 s
# of a short run's start (a 0.8M-parameter GPT on one core: 3.0 s of compiling, 0.5 s with them
# read from the cache).
MIN_COMPILE_SECONDS = 0.0


def enable(cache_dir: str | os.PathLike | None = None) -> Path | None:
  """Turns the cache on in `cache_dir` (default $TRANSFORMER_CACHE_DIR/jax, else
  ~/.cache/transformer/jax); returns the folder, or None where it stays off."""
  if os.environ.get("TRANSFORMER_COMPILATION_CACHE", "1") == "0":
    return None
  already = getattr(jax.config, "jax_compilation_cache_dir", None) or os.environ.get(
    "JAX_COMPILATION_CACHE_DIR"
  )
  if already:
    return _usable(str(already))
  if cache_dir is None:
    cache_dir = cache_root() / "jax"
  path = Path(cache_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:  # a read-only home: compile every time, as without the cache
    log.warning("no compilation cache in %s (%s)", path, error.strerror)
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path


def _usable(folder: str) -> Path | None:
  """A cache folder named by JAX_COMPILATION_CACHE_DIR (or set by a program), if it is or can
  become a folder: one that cannot (under /proc, a file) is named once and the cache stays off,
  where JAX printed its two-line UserWarning of a failed read and went on without it. A URL
  (gs://...) is JAX's to open."""
  path = Path(folder)
  if "://" in folder:
    return path
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    log.warning(
      "no compilation cache in %s (%s): check JAX_COMPILATION_CACHE_DIR", path, error.strerror
    )
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  return path
