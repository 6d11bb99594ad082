"""Trains a Transformer: `python train.py --config configs/default.py --workdir runs/NAME`.

Any config value can be overridden, e.g. `--config.num_train_steps=2000 --config.model.d_model=256`.
Running again with the same --workdir resumes from its last checkpoint.
"""

import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Recipe file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, the tokenizer, "
                               "metrics and translations are written.")


def parse_flags(argv):
  """absl's flag parsing, with a bad --config file or override reported in one line, no
  traceback."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.get("task")  # config_flags defers a file's load error to the first access
    return remaining
  except OSError as error:
    cause = str(error).strip().splitlines()[-1].strip()  # "[Errno 2] No such file ...: 'x.py'"
    print(f"error: cannot load --config: {cause}: pass a recipe file such as configs/default.py",
          file=sys.stderr)
    sys.exit(2)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    message = " ".join(str(error).replace("\\n", " ").split())
    unknown = re.search(r"(\w+)\\?'\s*Did you mean \"(\w+)\"", message)
    if unknown:  # ml_collections' locked config: an escaped KeyError inside an AttributeError
      message = f"unknown config key {unknown[1]!r}, did you mean {unknown[2]!r}?"
    print(f"error: bad flag or config override: {message} "
          "(see configs/ and transformer/train/config.py for the keys)", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config.KEY=VALUE")
  # Orbax and tfds log every file they touch at INFO through absl; keep the run's own lines.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("transformer").setLevel(logging.INFO)
  from transformer.cli import run_cli
  from transformer.train.loop import run
  return run_cli(lambda: run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  sys.exit(app.run(main, flags_parser=parse_flags))
