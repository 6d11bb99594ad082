"""`python -m transformer.visualize --workdir DIR "apple unveiled the new phone" [--contrast]`

Translates the sentence (beam search as the run was scored; `--beam_size 1` is greedy), runs the
model once on (source, BOS + translation) and writes PNG heatmaps of encoder self-attention, decoder
masked self-attention and encoder-decoder attention for every layer and head, plus `overview.png`
with the head-averaged maps. `--contrast` adds contrast.json and two figures comparing "apple" in
"please buy an apple and an orange" and "apple unveiled the new phone". Figures go to --out (default
WORKDIR/attention); their paths are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from transformer.cli import (
  ArgumentParser,
  add_model_arguments,
  argument_text,
  check_out_folder,
  run_cli,
)
from transformer.decode.config import DecodeConfig
from transformer.errors import UserError
from transformer.inspect.attention import prepare_sentence
from transformer.inspect.contrast import contrast_word
from transformer.inspect.figures import write_attention_figures, write_contrast
from transformer.runs.artifact import check_out_not_managed
from transformer.runs.translator import Translator, check_beam_positions, note_unknown


def load_translator(
  workdir: str | Path, *, step: int | None = None, average: int | None = None
) -> Translator:
  """The run's Translator (its exported model, or `step`, or `average`), if it translates."""
  # Absolute: Orbax reads no metadata from a relative checkpoint path (an OCDBT requirement).
  translator = Translator(Path(workdir).absolute(), step=step, average=average)
  if translator.task != "translation":
    raise UserError(
      f"{workdir} holds a {translator.task!r} model; attention figures are drawn "
      "for translation (encoder-decoder) runs"
    )
  return translator


@contextlib.contextmanager
def missing_glyphs_quiet() -> Iterator[None]:
  """Matplotlib's two-line warning for each character its font lacks (an emoji, a script) goes
  unsaid: the figure shows a box for it, and unknown pieces are noted once, in one line."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
    yield


def parse_args(argv=None) -> argparse.Namespace:
  parser = ArgumentParser(
    prog="python -m transformer.visualize", description="Attention heatmaps of a translation run."
  )
  parser.add_argument(
    "text", nargs="*", help="the sentence to visualise (its words may be given unquoted)"
  )
  parser.add_argument("--workdir", required=True, help="a run directory written by training")
  parser.add_argument("--out", help="where figures go (default: WORKDIR/attention)")
  parser.add_argument(
    "--contrast",
    action="store_true",
    help="also compare 'apple' in a fruit and in a company context",
  )
  add_model_arguments(parser)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  text = " ".join(map(argument_text, args.text)).strip()
  if not args.text and not args.contrast:
    raise UserError("no sentence given: pass one sentence (quoted), or --contrast")
  if args.text and not text:
    raise UserError("the sentence is empty: give one non-empty sentence to visualise")
  overrides = dict(beam_size=args.beam_size, alpha=args.alpha, stop=args.stop)
  DecodeConfig().overridden(**overrides)  # checked before the model is loaded
  out_dir = Path(args.out) if args.out else Path(args.workdir) / "attention"
  if args.out or Path(args.workdir).is_dir():  # (else the loader names what --workdir is)
    check_out_folder(out_dir, "the figures")
    check_out_not_managed(out_dir, Path(args.workdir), "attention")
  translator = load_translator(args.workdir, step=args.step, average=args.average)
  search = translator.search.overridden(**overrides)
  check_beam_positions(search.beam_size, translator.spec.model)
  model, tokenizer = translator.encoder_decoder, translator.tokenizer
  paths = []
  if text:
    (ids,) = tokenizer.encode([text])
    note_unknown(ids, "the sentence", "the translation will miss them")
    sentence = prepare_sentence(
      model,
      tokenizer,
      text,
      max_source_tokens=translator.max_source_tokens,
      search=search,
    )
    print(f"source: {sentence.text}\ntranslation: {sentence.translation}")
    with missing_glyphs_quiet():
      paths += write_attention_figures(model, sentence, out_dir)
  if args.contrast:
    report = contrast_word(
      model,
      tokenizer,
      max_source_tokens=translator.max_source_tokens,
      search=search,
    )
    with missing_glyphs_quiet():
      paths += write_contrast(report, out_dir)
  for path in paths:
    print(path)


def main_cli() -> int:
  """The `transformer-visualize` command: errors as one line and exit 2, no traceback."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  return run_cli(main, command=True)


if __name__ == "__main__":
  sys.exit(main_cli())
