"""`python -m transformer.translate --workdir DIR "A man is riding a bike."`

Sentences come from the arguments, `--file`, or stdin (one per line), and are translated in
batches with beam search (beam 4, alpha 0.6). For a decoder-only run the text is continued by
sampling (`--temperature`, `--top_k`, `--top_p`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from transformer.cli import run_cli
from transformer.decode.translator import Translator


def read_texts(args) -> list[str]:
  if args.text:
    return list(args.text)
  if args.file:
    path = Path(args.file)
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist: give an existing text file to --file")
    return path.read_text(encoding="utf-8").splitlines()
  return [line.rstrip("\n") for line in sys.stdin]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="python -m transformer.translate", description=__doc__)
  parser.add_argument("text", nargs="*", help="sentences; none: read --file or stdin, one a line")
  parser.add_argument("--workdir", required=True, help="a run directory written by training")
  parser.add_argument("--file", help="a text file with one sentence per line")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--beam_size", type=int, default=4, help="1 = greedy")
  parser.add_argument("--alpha", type=float, default=0.6, help="length penalty exponent")
  parser.add_argument("--max_new_tokens", type=int, default=40, help="language models only")
  parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  texts = read_texts(args)
  if not texts:
    raise ValueError("no input text: pass sentences as arguments, --file, or on stdin")
  translator = Translator(args.workdir)
  if translator.task == "mlm":
    raise ValueError(
      f"{args.workdir} holds a masked language model, which neither translates "
      "nor generates: use a translation or lm run"
    )
  for start in range(0, len(texts), args.batch_size):
    chunk = texts[start : start + args.batch_size]
    if translator.task == "translation":
      outputs = translator.translate(chunk, beam_size=args.beam_size, alpha=args.alpha)
    else:
      outputs = translator.continue_text(
        chunk,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed + start,
      )
    for line in outputs:
      print(line, flush=True)


def main_cli() -> int:
  """The `transformer-translate` command: errors as one line and exit 2, no traceback."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(main_cli())
