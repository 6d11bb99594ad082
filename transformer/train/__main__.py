"""`python -m transformer.train --config default --workdir runs/NAME` (also `transformer-train`).

`--config` takes a recipe's name (one of transformer/configs/) or a recipe file's path, and any
value can be overridden: `--config.num_train_steps=2000 --config.model.d_model=256`. Running
again with the same --workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from transformer.cli import recipe_path, run_cli

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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config file or override reported in one line, no
  traceback."""
  try:
    remaining = flags.FLAGS(_resolve_recipe(argv))
    _CONFIG.value.get("task")  # config_flags defers a file's load error to the first access
    return remaining
  except OSError as error:
    cause = str(error).strip().splitlines()[-1].strip()  # "[Errno 2] No such file ...: 'x.py'"
    print(
      f"error: cannot load --config: {cause}: pass a recipe such as default or a recipe file",
      file=sys.stderr,
    )
    sys.exit(2)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    message = " ".join(str(error).replace("\\n", " ").split())
    unknown = re.search(r"(\w+)\\?'\s*Did you mean \"(\w+)\"", message)
    if unknown:  # ml_collections' locked config: an escaped KeyError inside an AttributeError
      message = f"unknown config key {unknown[1]!r}, did you mean {unknown[2]!r}?"
    print(
      f"error: bad flag or config override: {message} "
      "(see transformer/train/config.py for the keys)",
      file=sys.stderr,
    )
    sys.exit(2)


def _train(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config.KEY=VALUE")
  # Orbax and tfds log every file they touch at INFO through absl; keep the run's own lines.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("transformer").setLevel(logging.INFO)
  from transformer.train.config import Config
  from transformer.train.loop import run

  return run_cli(lambda: run(Config.from_dict(_CONFIG.value.to_dict()), _WORKDIR.value))


def main(argv: list[str] | None = None) -> int:
  """The `transformer-train` command."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  return app.run(_train, argv=argv or sys.argv, flags_parser=parse_flags)


if __name__ == "__main__":
  sys.exit(main())
