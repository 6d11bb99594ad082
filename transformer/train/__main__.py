"""`python -m transformer.train --config default --workdir runs/NAME` (also `transformer-train`).

`--config` takes a recipe's name (one of transformer/configs/) or a recipe file's path, and any
value can be overridden: `--config.num_train_steps=2000 --config.model.d_model=256`. Running
again with the same --workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import difflib
import logging
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from transformer.cli import recipe_path, run_cli
from transformer.parallel import supervisor

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Recipe name (e.g. default) or file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  "runs/default",
  "Where checkpoints, the tokenizer, metrics and translations are written.",
)


def _resolve_recipe(argv: list[str]) -> list[str]:
  """argv with `--config NAME` turned into that recipe's file; no --config means `default`."""
  out, given = [], False
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      given = True
      out.append("--config=" + recipe_path(arg.split("=", 1)[1]))
    elif arg == "--config" and i + 1 < len(argv):
      given = True
      out.append(arg)
    elif i > 0 and argv[i - 1] == "--config":
      out.append(recipe_path(arg))
    else:
      out.append(arg)
  return out if given else [*out, "--config=" + recipe_path("default")]


def _check_given_once(argv: list[str], flag: str, advice: str) -> None:
  """One `flag` (--config, --workdir) a command: absl would take the last and drop the others
  without a word (train on another recipe, or in another folder, than the user sees first)."""
  values = []
  for i, arg in enumerate(argv):
    if arg.startswith(f"{flag}="):
      values.append(arg.split("=", 1)[1])
    elif arg == flag and i + 1 < len(argv):
      values.append(argv[i + 1])
  if len(values) > 1:
    _fail(f"{flag} is given {len(values)} times ({', '.join(values)}): {advice}")


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _check_override_keys(argv: list[str]) -> None:
  """Every `--config.a.b=value` names a key of the schema (the recipes only set values), so an
  unknown one is named in full before the flags are parsed."""
  from transformer.config import derived_key_message, get_config

  schema = get_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config.") :].split("=", 1)[0]
    node = schema
    for depth, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        if derived := derived_key_message(key):
          _fail(derived)
        prefix = ".".join(key.split(".")[:depth])
        close = difflib.get_close_matches(
          part, list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else [], n=1
        )
        hint = f", did you mean {'.'.join(filter(None, [prefix, close[0]]))}?" if close else ""
        _fail(f"unknown config key {key}{hint} (see transformer/config.py for the keys)")
      node = node[part]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config file or override reported in one line, no
  traceback."""
  _check_override_keys(argv)
  try:
    resolved = _resolve_recipe(argv)
  except ValueError as error:
    _fail(str(error))
  try:
    remaining = flags.FLAGS(resolved)
    config = _CONFIG.value
    getattr(config, "task", None)  # config_flags defers a file's load error to the first access
  except OSError as error:
    cause = str(error).strip().splitlines()[-1].strip()  # "[Errno 2] No such file ...: 'x.py'"
    _fail(f"cannot load --config: {cause}: pass a recipe such as default or a recipe file")
  except SyntaxError as error:
    _fail(
      f"cannot load --config: {error.filename} line {error.lineno}: {error.msg}: fix the "
      "recipe file"
    )
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    message = " ".join(str(error).replace("\\n", " ").split())
    _fail(f"bad flag or config override: {message} (see transformer/config.py for the keys)")
  except Exception as error:
    _fail(f"cannot load --config: the recipe raised {type(error).__name__}: {error}")
  # After the recipe loaded: a recipe that cannot be loaded is named first, as such.
  _check_given_once(
    argv, "--config", "give one recipe, and change its values with --config.KEY=VALUE"
  )
  _check_given_once(argv, "--workdir", "give the run's directory once")
  if len(remaining) > 1:  # absl's usage text would bury the cause
    _fail(
      f"unexpected arguments {' '.join(remaining[1:])}: train takes only flags, such as "
      "--workdir DIR and --config.KEY=VALUE"
    )
  if not isinstance(config, ml_collections.ConfigDict):
    _fail(
      f"--config: the recipe's get_config() returned a {type(config).__name__}, not the "
      "ConfigDict of transformer.config.get_config(): return that, with values set"
    )
  return remaining


class _PlainFormatter(logging.Formatter):
  """Time and message; warnings and errors also say so."""

  def format(self, record: logging.LogRecord) -> str:
    line = super().format(record)
    if record.levelno >= logging.WARNING:
      time_part, _, message = line.partition(" ")
      return f"{time_part} {record.levelname}: {message}"
    return line


def _train(argv: list[str], args: list[str]) -> int:
  """The command, once its flags are parsed (`argv`: what is left of them, the program's name
  alone, as `parse_flags` refuses any other; `args`: the command's own arguments, as given)."""
  parallel = _CONFIG.value.parallel
  if supervisor.is_supervised():
    supervisor.stop_with_supervisor()
  elif supervisor.joins_a_job(parallel.coordinator_address, parallel.num_processes):
    # One host's process of a job: see parallel/supervisor.py.
    return supervisor.supervise(["-m", "transformer.train", *args])
  # Orbax and tfds log every file they touch at INFO through absl; keep the run's own lines,
  # plain ("12:01:02 step 300/900 loss ..."), on stderr.
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(_PlainFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
  ours = logging.getLogger("transformer")
  ours.addHandler(handler)
  ours.propagate = False
  ours.setLevel(logging.INFO)

  def train():
    # Imported here so that Ctrl-C during JAX's import is also one line.
    from transformer.config import Config
    from transformer.train.loop import run

    run(Config.from_dict(_CONFIG.value.to_dict()), _WORKDIR.value)

  return run_cli(train, command=True)


def main(argv: list[str] | None = None) -> int:
  """The `transformer-train` command."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  argv = argv or sys.argv
  try:
    return app.run(lambda rest: _train(rest, argv[1:]), argv=argv, flags_parser=parse_flags)
  except KeyboardInterrupt:  # while the flags and the recipe load: nothing was started
    print("stopped by an interrupt", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
