"""Trains a Transformer: `python train.py --config default --workdir runs/NAME`.

The same as `python -m transformer.train` and the installed `transformer-train` command; see
transformer/train/__main__.py for the flags.
"""

import sys

from transformer.train.__main__ import main

if __name__ == "__main__":
  sys.exit(main())
