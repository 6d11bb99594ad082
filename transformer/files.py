"""Files written whole or not at all: a reader, a crash or a signal never finds half of one."""

from __future__ import annotations

import os
from pathlib import Path


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
