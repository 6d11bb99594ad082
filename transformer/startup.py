"""A command's first second: a signal while Python imports JAX ends it with one line.

A command installs its signal handlers when it starts (`transformer.cli.run_cli`), after its
imports, which take one to two seconds (JAX, Flax). A SIGTERM in that time ended the process
with 143 and no word, a Ctrl-C with a KeyboardInterrupt traceback out of some import. The
package imports this module first, and when the process is one of the package's commands (and
only then: a program importing the package keeps its own signal handling) it ends the process on
a signal at once, with one line and 130: nothing has been read or written yet. Standard library
only, so that it is in place before anything heavy is imported; `import_jax` then imports JAX,
so that an environment variable JAX refuses as it is imported (JAX_ENABLE_X64=maybe) is one line
in a command, not a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

# The scripts that start a command: train.py at the top of the tree, and the installed commands
# (pyproject.toml's [project.scripts]; by exact name: a program of one's own called
# `transformer-demo.py` keeps its own signal handling).
_TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
_COMMAND_SCRIPTS = tuple(
  f"transformer-{name}"
  for name in ("train", "translate", "evaluate", "visualize", "export", "sample")
)
# The interpreter's options whose value is the next argument (`python -X utf8 -m ...`).
_OPTIONS_WITH_VALUES = ("-X", "-W", "--check-hash-based-pycs")


def is_command(orig_argv: list[str]) -> bool:
  """Whether the interpreter was started to run one of the package's commands:
  `python -m transformer.<command>`, `python train.py`, or an installed `transformer-<command>`."""
  args = orig_argv[1:]
  skip = False
  for at, arg in enumerate(args):
    if skip:  # the value of an interpreter option
      skip = False
      continue
    if arg in _OPTIONS_WITH_VALUES:
      skip = True
      continue
    if arg == "-m":
      module = args[at + 1] if at + 1 < len(args) else ""
      return module == "transformer" or module.startswith("transformer.")
    if arg.startswith("-m"):  # -mtransformer.train
      return arg[2:] == "transformer" or arg[2:].startswith("transformer.")
    if arg in ("-c", "-"):
      return False
    if not arg.startswith("-"):  # the script
      path = Path(arg)
      return path.name in _COMMAND_SCRIPTS or _same_file(path, _TRAIN_SCRIPT)
  return False


def _same_file(path: Path, other: Path) -> bool:
  try:
    return path.resolve() == other
  except OSError:
    return False


def _stop(signum, frame) -> None:
  del frame
  name = signal.Signals(signum).name
  os.write(2, f"stopped: {name} while the command was starting; nothing was written\n".encode())
  os._exit(130)


def stop_until_started() -> None:
  """In a command's process, SIGTERM, SIGINT and SIGHUP end it with one line and 130 until the
  command installs its own handlers (SIGHUP and SIGINT only where they are not ignored, as
  under nohup or in a background job)."""
  if not is_command(getattr(sys, "orig_argv", [])):
    return
  for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    if signum != signal.SIGTERM and signal.getsignal(signum) == signal.SIG_IGN:
      continue
    signal.signal(signum, _stop)


# How JAX refuses an environment variable it reads while it is imported (JAX_ENABLE_X64=maybe,
# JAX_DEFAULT_MATMUL_PRECISION=bogus): `Invalid value "v" for JAX flag jax_name`, or `invalid
# truth value 'v' for environment 'JAX_NAME'`.
_JAX_FLAG = re.compile(r"for JAX flag (\w+)|for environment '(\w+)'")


# How XLA refuses a flag of XLA_FLAGS: from C++, the first time a backend is made (after the
# command has started its work), with `F... parse_flags_from_env.cc] Unknown flag in XLA_FLAGS:
# --name=value` and exit 1, before Python can say anything.
_UNKNOWN_XLA_FLAG = re.compile(r"Unknown flags? in XLA_FLAGS: (.+)")
_PARSE_XLA_FLAGS = "from jaxlib import _jax; _jax.CompileOptions()"  # XLA's own parser, ~0.1 s


def check_xla_flags() -> None:
  """In a command's process with XLA_FLAGS set: XLA's parser run on them in a child process
  first, so that a flag this jaxlib's XLA does not know ends the command with one line and 2,
  before anything is read or written. No verdict (no jaxlib, a child that cannot run) leaves
  the judging to XLA itself."""
  if not os.environ.get("XLA_FLAGS", "").strip():
    return
  if not is_command(getattr(sys, "orig_argv", [])):
    return
  try:
    probe = subprocess.run(
      [sys.executable, "-c", _PARSE_XLA_FLAGS], capture_output=True, text=True, timeout=120
    )
  except (OSError, subprocess.SubprocessError):
    return
  match = _UNKNOWN_XLA_FLAG.search(probe.stderr)
  if probe.returncode != 0 and match:
    os.write(
      2,
      f"error: XLA_FLAGS holds {match.group(1).strip()}, a flag this version of XLA (jaxlib) "
      "does not know: remove it from XLA_FLAGS or correct its name\n".encode(errors="replace"),
    )
    os._exit(2)


def import_jax() -> None:
  """Imports JAX. In a command's process, an environment variable JAX refuses at import ends
  the command with one line naming it, and 2, instead of a traceback out of the package's
  import (a program importing the package gets JAX's exception)."""
  check_xla_flags()
  try:
    import jax  # noqa: F401
  except ValueError as error:
    match = _JAX_FLAG.search(str(error))
    if not match or not is_command(getattr(sys, "orig_argv", [])):
      raise
    name = match.group(2) or match.group(1).upper()
    value = os.environ.get(name, "")
    os.write(
      2,
      f"error: the environment variable {name}={value!r} is refused by JAX ({error}): unset "
      f"it or give it a value JAX takes\n".encode(errors="replace"),
    )
    os._exit(2)
