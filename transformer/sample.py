"""`python -m transformer.sample --workdir DIR --prompt "ROMEO:"` (also `transformer-sample`)

Samples text from a trained language model (task lm): the prompt, then up to `--max_new_tokens`
tokens drawn from softmax(logits / temperature), restricted to the `--top_k` most likely and to
the smallest set holding `--top_p` of the probability. `--temperature 0` is greedy; `--seed`
makes a sample repeatable. A model of running text (dataset text, e.g. the shakespeare_char
recipe) continues past its context by sliding it along; an empty prompt starts a document.
"""

from __future__ import annotations

import argparse
import logging
import sys

from transformer.cli import ArgumentParser, positive_int, run_cli
from transformer.errors import UserError
from transformer.runs.translator import Translator


def parse_args(argv=None):
  parser = ArgumentParser(
    prog="python -m transformer.sample",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--workdir", required=True, help="a run directory of an lm run")
  parser.add_argument("--prompt", default="", help="text to continue (default: none)")
  parser.add_argument("--max_new_tokens", type=positive_int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top_k", type=positive_int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_samples", type=positive_int, default=1)
  parser.add_argument("--step", type=positive_int, help="use checkpoint STEP")
  parser.add_argument(
    "--average", type=positive_int, help="use the mean of the newest K checkpoints"
  )
  return parser.parse_args(argv)


def main(argv=None) -> list[str]:
  args = parse_args(argv)
  translator = Translator(args.workdir, step=args.step, average=args.average)
  if translator.task != "lm":
    raise UserError(
      f"{args.workdir} holds a {translator.task!r} model: sampling needs an lm run "
      "(translate a translation run with python -m transformer.translate)"
    )
  # One call for every sample (sample k drawn with `nth_seed(seed, k)`): the settings, the seed
  # and the prompt's unknown pieces are checked once, before the first is printed.
  continuations = translator.continuations(
    [args.prompt] * args.num_samples,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    seed=args.seed,
  )
  samples = []
  for k, text in enumerate(continuations):
    samples.append(args.prompt + text)  # the text starts with a space where it starts a word
    print(samples[-1], flush=True)
    if k + 1 < args.num_samples:
      print("---", flush=True)
  return samples


def main_cli() -> int:
  """The `transformer-sample` command: errors as one line and exit 2, no traceback."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  return run_cli(main, command=True)


if __name__ == "__main__":
  sys.exit(main_cli())
