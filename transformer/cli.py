"""Command-line conventions: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import importlib.util
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from transformer.decode.config import STOP_RULES
from transformer.errors import MissingFile, UserError


def recipes_dir() -> Path:
  """Where the shipped recipes are: the `transformer.configs` package (configs/ at the top of
  the source tree, installed under that name). Found, not imported: this module runs none of
  them."""
  spec = importlib.util.find_spec("transformer.configs")
  if spec is None or not spec.submodule_search_locations:
    raise MissingFile(
      "the shipped recipes (transformer.configs) are missing: reinstall the package"
    )
  return Path(next(iter(spec.submodule_search_locations)))


class Stopped(KeyboardInterrupt):
  """A signal stopped the command after it saved what it had to (the message says what)."""


def is_user_error(error: BaseException) -> bool:
  """What the user can fix: a `UserError`, or the OS refusing a path the command was given or
  writes to (--workdir /dev/null/x, a read-only folder). Anything else is a bug."""
  return (
    isinstance(error, UserError)
    or (isinstance(error, OSError) and error.filename is not None and bool(error.strerror))
    or no_backend(error)
  )


def no_backend(error: BaseException) -> bool:
  """JAX cannot start the platform the environment names (JAX_PLATFORMS=tpu on a machine
  without one): the user's environment, not a bug. (JAX_PLATFORMS=cuda without an NVIDIA GPU
  fails JAX's own assertion, in jax/_src/xla_bridge.py, instead of saying so.)"""
  if isinstance(error, RuntimeError):
    return str(error).startswith("Unable to initialize backend")
  if not isinstance(error, AssertionError) or not os.environ.get("JAX_PLATFORMS"):
    return False
  import jax  # already imported: JAX raised the error (its traceback keeps none of its frames)

  try:
    jax.devices()
  except AssertionError:
    return True
  return False


def run_cli(main: Callable[[], object], *, command: bool = False) -> int:
  """Runs `main`; a user error prints `error: <message>` and exits 2, Ctrl-C/SIGTERM exits 130
  with one line saying what was kept. Any other exception is a bug: its traceback is printed
  and the exit status is 1. Output is UTF-8 whatever the locale; a reader that went away
  (`| head`) ends the command quietly (141, as SIGPIPE would), an output that cannot be written
  (a full disk) is one line. `command`: the process ends when this returns (a console
  command), so a signal after the work is done is ignored (the exit status is the work's; a
  Ctrl-C then landed in the interpreter's teardown, as `Exception ignored in ...`)."""
  unicode_output()
  _STOP.clear()
  previous = stop_on_sigterm()
  quiet = QuietStorageErrors()
  for name in QuietStorageErrors.LOGGERS:
    logging.getLogger(name).addFilter(quiet)
  unraisable = sys.unraisablehook
  sys.unraisablehook = _quiet_dropped_stop(quiet.unraisablehook(unraisable))
  in_thread, threading.excepthook = threading.excepthook, quiet.excepthook(threading.excepthook)
  stdout, sys.stdout = sys.stdout, _Output(sys.stdout)
  try:
    main()
    flush_output()  # a failure to deliver the output is this command's, not the exit's
  except Stopped as stop:
    print(f"stopped: {stop}", file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print("stopped by an interrupt", file=sys.stderr)
    return 130
  except (OutputError, BrokenPipeError) as error:
    # Whatever is left in the buffer goes nowhere: the interpreter's own last flush must not
    # fail again with a message of its own.
    with contextlib.suppress(OSError, ValueError):  # (a stdout without a descriptor)
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    cause = error.__cause__ if isinstance(error, OutputError) else error
    if isinstance(cause, BrokenPipeError):
      return 141
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
    print(
      f"error: the output cannot be written ({reason}): check where standard output goes "
      "(a full disk, a closed terminal)",
      file=sys.stderr,
    )
    return 2
  except Exception as error:
    if storage_full(error):
      # Background writers (Orbax's save threads, tensorstore's callbacks) go on printing
      # tracebacks of the same failed write: silence stderr for everyone first, then say it
      # once on the saved descriptor, and leave without waiting for those threads.
      sys.stdout.flush()
      sys.stderr.flush()
      saved = os.dup(2)
      os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
      # A thread may have been cut off mid-line: the message starts a line of its own.
      os.write(saved, f"\nerror: {storage_message(error)}\n".encode())
      os._exit(2)
    if not is_user_error(error):
      raise
    print(f"error: {user_message(error)}", file=sys.stderr)
    return 2
  finally:
    _STOP.clear()  # a later command in this process (tests, notebooks) starts unstopped
    sys.stdout = stdout
    for name in QuietStorageErrors.LOGGERS:
      logging.getLogger(name).removeFilter(quiet)
    sys.unraisablehook = unraisable
    threading.excepthook = in_thread
    for signum, handler in previous.items():
      signal.signal(signum, signal.SIG_IGN if command else handler)
  return 0


class QuietStorageErrors(logging.Filter):
  """Drops the log records of a write refused for lack of space (Orbax's save threads log the
  same failed write four times, with tracebacks, ~340 lines): `run_cli` says it in one line.
  The writes Orbax then abandons still complete into its closed event loop, and tensorstore
  reports each callback's "Event loop is closed" as unraisable (~200 lines): those go too, as do
  the same failed writes ending the save's other threads and asyncio's tasks."""

  LOGGERS = ("absl", "asyncio")  # Orbax logs through absl; its abandoned tasks through asyncio

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (
      (error is not None and self.quiet(error))
      or any(os.strerror(code) in record.getMessage() for code in STORAGE_ERRNOS)
    )

  @staticmethod
  def quiet(error: BaseException) -> bool:
    """A refused write, or a write into the temporary folder of a save that failed and was
    removed (`runs.checkpoint` removes it while the save's last writers end)."""
    removed = isinstance(error, FileNotFoundError) and ".orbax-checkpoint-tmp" in str(error)
    return removed or storage_full(error)

  @staticmethod
  def unraisablehook(previous):
    def hook(unraisable):
      error, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
      closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
      if not (closed_loop and frames and frames[-1].name == "_check_closed"):
        previous(unraisable)

    return hook

  @staticmethod
  def excepthook(previous):
    def hook(args):
      if args.exc_value is None or not QuietStorageErrors.quiet(args.exc_value):
        previous(args)

    return hook


def stop_on_sigterm() -> dict[signal.Signals, Any]:
  """SIGTERM (and SIGHUP: the terminal closed, unless nohup ignores it) raises `Stopped`, as
  Ctrl-C raises KeyboardInterrupt, so that the commands end with one line and 130 at any moment
  (the training loop installs its own handler while it trains). Every file is written under a
  temporary name and renamed, so nothing is left half-written. Returns the handlers it replaced
  (none off the main thread, where handlers cannot be set)."""
  if threading.current_thread() is not threading.main_thread():
    return {}

  def stop(signum, frame):
    del frame
    _STOP.append(signum)  # kept, in case the raise lands where Python drops it (a finalizer)
    if signum == signal.SIGINT:
      raise KeyboardInterrupt
    raise Stopped(_stopped_by(signum))

  previous = {}
  for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    handler = signal.getsignal(signum)
    if signum != signal.SIGTERM and handler == signal.SIG_IGN:  # nohup; a background job
      continue
    previous[signum] = handler if handler is not None else signal.SIG_DFL
    signal.signal(signum, stop)
  return previous


_STOP: list[int] = []  # the signals `stop_on_sigterm`'s handler has raised for


def _stopped_by(signum: int) -> str:
  return (
    f"{signal.Signals(signum).name}; nothing was left half-written (every file is written "
    "whole or not at all)"
  )


def _quiet_dropped_stop(previous):
  """An unraisable-exception hook that leaves out the stop `stop_on_sigterm`'s handler raised
  where Python drops exceptions (a garbage-collection callback, a finalizer): Python would print
  it as "Exception ignored in ..." with a traceback, and `check_stopped` raises it again where the
  command can stop with its one line."""

  def hook(unraisable):
    if not (_STOP and isinstance(unraisable.exc_value, KeyboardInterrupt)):  # Stopped included
      previous(unraisable)

  return hook


def check_stopped() -> None:
  """Raises the stop a signal asked for, if its first raise was lost: Python drops an exception
  raised inside a weakref finalizer or a garbage-collection callback (JAX runs some), and the
  command would go on to the end. Called between the long steps of a command."""
  if _STOP:
    signum = _STOP[0]
    if signum == signal.SIGINT:
      raise KeyboardInterrupt
    raise Stopped(_stopped_by(signum))


def unicode_output() -> None:
  """stdout and stderr as UTF-8 when the locale's encoding cannot write every character (an
  ASCII locale): translations of German text are printed, not a UnicodeEncodeError. What UTF-8
  cannot hold either (a path that is not UTF-8, kept by Python as surrogates) is printed as its
  escape. Input is read as UTF-8 too, whatever the locale."""
  for stream in (sys.stdout, sys.stderr):
    if not hasattr(stream, "reconfigure"):
      continue
    encoding = getattr(stream, "encoding", None) or "utf-8"
    if codecs.lookup(encoding).name not in ("utf-8", "utf-16", "utf-32"):
      stream.reconfigure(encoding="utf-8")
    stream.reconfigure(errors="backslashreplace")


class OutputError(Exception):
  """Standard output refused a write (raised from the OSError): not the workdir's disk."""


class _Output:
  """Standard output whose refused writes are `OutputError`s, whichever command prints (a full
  disk under `> file` is the output's problem, not the workdir's)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except OSError as error:
      raise OutputError(str(error)) from error

  def flush(self) -> None:
    try:
      self._stream.flush()
    except OSError as error:
      raise OutputError(str(error)) from error

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


def emit(line: str) -> None:
  """Prints `line` to stdout at once (a translation as soon as it is done); a write that
  stdout refuses is an `OutputError`, which `run_cli` tells apart from a full workdir."""
  try:
    print(line, flush=True)
  except OSError as error:
    raise OutputError(str(error)) from error


def flush_output() -> None:
  try:
    sys.stdout.flush()
  except OSError as error:
    raise OutputError(str(error)) from error


# A full disk, a quota or a file-size limit, as the OS says it (OSError) or as a library that
# wraps the OS error in its own exception spells it (tensorstore, ArrayRecord, tfds).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is a write refused for lack of space."""
  seen = set()
  link: BaseException | None = error
  while link is not None and id(link) not in seen:
    seen.add(id(link))
    if isinstance(link, OSError) and link.errno in STORAGE_ERRNOS:
      return True
    if any(os.strerror(code) in str(link) for code in STORAGE_ERRNOS):
      return True
    link = link.__cause__ or link.__context__
  return False


def storage_message(error: BaseException) -> str:
  reason = next(
    (os.strerror(code) for code in STORAGE_ERRNOS if os.strerror(code) in str(error)),
    "no space left",
  )
  return (
    f"a write failed ({reason}): free space where the run writes (--workdir and the cache, "
    "$TRANSFORMER_CACHE_DIR or ~/.cache/transformer) and run the same command again; "
    "complete checkpoints are kept"
  )


def user_message(error: BaseException) -> str:
  """The first line of the error; an OS error on a path says which path and what to check."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    return (
      f"{error.filename}: {error.strerror}: check the path (a writable directory for "
      "--workdir, an existing file otherwise)"
    )
  if no_backend(error):
    platforms = os.environ.get("JAX_PLATFORMS", "")
    cause = str(error).splitlines()[0].split(" (set JAX_PLATFORMS")[0] if str(error) else ""
    return (
      f"{cause or f'JAX found no {platforms} device'}: JAX_PLATFORMS={platforms} names a "
      "platform this machine does not have: unset it (JAX then takes what the machine has), "
      "or set it to one it has (cpu is always there)"
    )
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def check_out_folder(out: Path, what: str) -> None:
  """Refuses, before anything is loaded or computed, an --out that cannot become a folder for
  `what` (the command's results): a file, a path through a file, a folder this user cannot
  write. (A file there failed only when the first result was written, after all the work.)"""
  for folder in (out, *out.parents):
    if folder.exists():  # the nearest existing one: the rest is made
      if not folder.is_dir():
        where = "is a file" if folder == out else f"lies under {folder}, which is a file"
        raise UserError(f"--out {out} {where}: give a folder for {what} (made if absent)")
      if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {folder} is not writable: give a folder you can write")
      return


def recipe_names() -> list[str]:
  return sorted(p.stem for p in recipes_dir().glob("*.py") if not p.stem.startswith("_"))


def recipe_path(name_or_path: str) -> str:
  """The file of a recipe given by name ("default") or by path (an existing file, or any
  `*.py`, left for the loader to report if it is missing).

  A shipped recipe's name always means the shipped recipe, whatever files the current folder
  holds: a file named `smoke` there is not run for `--config smoke` (a file is given as a path,
  `./smoke.py` or `configs/x.py`)."""
  if name_or_path in recipe_names():
    return str(recipes_dir() / f"{name_or_path}.py")
  if name_or_path.endswith(".py") or Path(name_or_path).is_file():
    return name_or_path
  raise UserError(
    f"--config {name_or_path!r} is neither a file nor a recipe: use one of "
    f"{', '.join(recipe_names())}, or a path to a recipe file"
  )


def argument_text(text: str) -> str:
  """A command-line sentence as the UTF-8 it was typed in: under an ASCII locale Python keeps
  its other bytes as surrogates, which the tokenizer cannot take."""
  try:
    return os.fsencode(text).decode("utf-8")
  except UnicodeDecodeError:
    raise UserError(f"the argument {text!r} is not UTF-8: type it in UTF-8") from None


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} must be at least 1")
  return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  """--step / --average: which parameters of a run a command uses (default: its exported model),
  and --beam_size / --alpha / --stop: how it searches (default: as the run was scored)."""
  parser.add_argument("--step", type=positive_int, help="use checkpoint STEP")
  parser.add_argument(
    "--average", type=positive_int, help="use the mean of the newest K checkpoints"
  )
  parser.add_argument("--beam_size", type=positive_int, help="1 = greedy (default: the run's)")
  parser.add_argument("--alpha", type=float, help="length penalty exponent (default: the run's)")
  parser.add_argument(
    "--stop",
    choices=STOP_RULES,
    help="when a sentence's beam search ends: heuristic (its best alive hypothesis would not "
    "win by ending next) or exact (none could win at any length) (default: the run's)",
  )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--threads",
    type=positive_int,
    help="CPU cores to compute on (default: every one this process may use); fewer spend less "
    "CPU time on work too small to share out, as decoding is",
  )


def use_cores(count: int | None) -> None:
  """Computes on `count` threads (None: one per CPU core the process may use). XLA:CPU sizes its
  thread pools by the cores the process may use when its backend starts: the process is held to
  `count` of them while the backend starts, then every thread may run on any allowed core again,
  so that two commands with --threads 1 are not both held to the first core. Decoding runs many
  small programs whose work threads share out at a cost (test_2016 on the 2-core Xeon: beam 4 and
  greedy take 17-20% and 7-12% fewer CPU seconds on one thread than on two, and batch-1 as
  fast)."""
  if count is None:
    return
  if not hasattr(os, "sched_setaffinity"):
    raise UserError("--threads needs a system that lets a process choose its cores (Linux)")
  cores = sorted(os.sched_getaffinity(0))
  if count > len(cores):
    raise UserError(
      f"--threads {count} is more than the {len(cores)} CPU core(s) this process may use"
    )
  from jax._src import xla_bridge  # (jax is imported by now; its backend may not be started)

  if xla_bridge.backends_are_initialized():  # a command called from Python, after JAX started
    logging.getLogger(__name__).warning(
      "--threads %d has no effect: JAX has already started in this process", count
    )
    return
  os.sched_setaffinity(0, cores[:count])
  import jax

  jax.devices()  # the backend starts, its pools sized by `count` cores
  for thread in os.listdir("/proc/self/task"):  # each thread's own mask, inherited at its start
    with contextlib.suppress(OSError):  # a thread that ended meanwhile
      os.sched_setaffinity(int(thread), cores)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with a bad argument reported as one line (`error: ...`, exit 2) like every other
  user error, instead of a usage block."""

  def error(self, message: str) -> NoReturn:
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(2)
