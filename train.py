"""Trains a Transformer: `python train.py --config configs/default.py --workdir runs/NAME`.

Any config value can be overridden, e.g. `--config.num_train_steps=2000 --config.model.d_model=256`.
Running again with the same --workdir resumes from its last checkpoint.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Recipe file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, the tokenizer, "
                               "metrics and translations are written.")


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
  sys.exit(app.run(main))
