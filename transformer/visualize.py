"""`python -m transformer.visualize --workdir DIR "apple unveiled the new phone" [--contrast]`

Translates the sentence (beam 4; `--beam_size 1` is greedy), runs the model once on (source,
BOS + translation) and writes PNG heatmaps of encoder self-attention, decoder masked
self-attention and encoder-decoder attention for every layer and head, plus `overview.png` with
the head-averaged maps. `--contrast` adds contrast.json and two figures comparing "apple" in
"please buy an apple and an orange" and "apple unveiled the new phone". Figures go to --out
(default WORKDIR/attention); their paths are printed.
"""

import logging
import sys

from transformer.cli import run_cli
from transformer.decode.visualize import main

if __name__ == "__main__":
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  sys.exit(run_cli(main))
