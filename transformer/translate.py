"""`python -m transformer.translate --workdir DIR "A man is riding a bike."`

Sentences come from the arguments, `--file`, or stdin (one per line), and are translated in
batches with beam search (beam 4, alpha 0.6). For a decoder-only run the text is continued by
sampling (`--temperature`, `--top_k`, `--top_p`).
"""

import logging
import sys

from transformer.cli import run_cli
from transformer.decode.translate import main

if __name__ == "__main__":
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  sys.exit(run_cli(main))
