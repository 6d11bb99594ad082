"""Files written whole or not at all (a reader, a crash or a signal never finds half of one), and
the cache folder runs share."""

from __future__ import annotations

import os
from pathlib import Path

from transformer.errors import UserError


def write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes `text` to `path` as UTF-8 (whatever the locale) under a temporary name in the same
  folder, then renames it into place; an interrupted write leaves the old file, or none. A
  character UTF-8 cannot hold (a lone surrogate: a path that is not UTF-8) is written as its
  \\u escape, which a JSON reader reads back as the same string."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def cache_root() -> Path:
  """$TRANSFORMER_CACHE_DIR, else ~/.cache/transformer: where prepared data and compiled
  programs are shared by later runs and commands. A folder the variable names is made if
  missing, and must be writable: the user asked for it, so it is not quietly done without."""
  named = os.environ.get("TRANSFORMER_CACHE_DIR")
  if not named:
    return Path.home() / ".cache" / "transformer"
  path = Path(named)
  try:
    path.mkdir(parents=True, exist_ok=True)
    reason = None if os.access(path, os.W_OK | os.X_OK) else "not writable"
  except OSError as error:
    reason = error.strerror or str(error)
  if reason:
    raise UserError(
      f"TRANSFORMER_CACHE_DIR={named} cannot hold the cache ({reason}): point it at a "
      "writable folder, or unset it"
    )
  return path
