"""Command-line conventions: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import sys
from typing import Callable

# Errors that mean "the input or config is wrong", as opposed to a bug worth a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, PermissionError, KeyError)


def run_cli(main: Callable[[], object]) -> int:
  """Runs `main`; a user error prints `error: <message>` and exits 2, Ctrl-C/SIGTERM exits 130."""
  from transformer.train.checkpoint import CheckpointError
  try:
    main()
  except KeyboardInterrupt as stop:
    print(f"stopped by {stop or 'interrupt'}: the last checkpoint is saved; run the same "
          "command to resume", file=sys.stderr)
    return 130
  except (*USER_ERRORS, CheckpointError) as error:
    logging.getLogger(__name__).debug("user error", exc_info=True)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
  return 0
