"""`python -m transformer.translate --workdir DIR "A man is riding a bike."` (also
`transformer-translate`)

Sentences come from the arguments, `--file`, or stdin, one per line, and each translation is
printed as soon as its batch is done: lines already waiting are translated together (up to
`--batch_size`), a line typed at a terminal at once. A blank line gives a blank line. The run's
exported model is used (WORKDIR/model); `--step N` takes checkpoint N, `--average K` the mean of
the newest K checkpoints. Beam search with the run's own beam size and length penalty by
default; for a decoder-only run the text is continued by sampling (`--temperature`, `--top_k`,
`--top_p`, `--seed`, `--max_new_tokens`). Each kind of run refuses the other's flags. A line is
read up to 1 MiB.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from transformer import compilation_cache
from transformer.allocator import freeze_imported_objects, keep_freed_memory
from transformer.cli import (
  ArgumentParser,
  add_model_arguments,
  add_threads_argument,
  argument_text,
  check_stopped,
  emit,
  positive_int,
  run_cli,
  use_cores,
)
from transformer.errors import MissingFile, UserError
from transformer.runs.translator import Translator, check_beam_positions, nth_seed

_END = object()
# The longest input line read, in bytes: ~10^5 words, far past any model's positions (a longer
# source is cut to them). A stream without line ends (< /dev/zero) grew one line until memory ran
# out; the batches in flight hold at most 4 x --batch_size lines of this size.
MAX_LINE_BYTES = 2**20

# Which flags each kind of run takes: given to the other kind, they would be silently ignored.
SEARCH_FLAGS = ("beam_size", "alpha", "stop", "max_extra_tokens")
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
SAMPLING_DEFAULTS = {"max_new_tokens": 40, "temperature": 1.0, "seed": 0}


def decoded_lines(stream: IO[bytes], name: str) -> Iterator[str]:
  """The lines of a byte stream as text, without their line ends; a line that is not UTF-8 or
  longer than `MAX_LINE_BYTES` is a one-line error naming it."""
  for number, raw in enumerate(bounded_lines(stream, name), start=1):
    if number == 1:
      raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the text
    try:
      yield raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
      raise UserError(f"{name} line {number} is not UTF-8: convert the input to UTF-8") from None


def bounded_lines(stream: IO[bytes], name: str) -> Iterator[bytes]:
  """The raw lines of a stream, each read only up to `MAX_LINE_BYTES` (+ its line end)."""
  for number in itertools.count(1):
    raw = stream.readline(MAX_LINE_BYTES + 1)
    if not raw:
      return
    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
      raise UserError(
        f"{name} line {number} is longer than {MAX_LINE_BYTES:,} bytes without a line end: "
        "give one sentence a line"
      )
    yield raw


def batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
  """Lines in batches of up to `size`: a batch takes the lines already read and does not wait
  for more, so piped files are translated in full batches and typed lines one by one."""
  waiting: queue.Queue = queue.Queue(maxsize=4 * size)
  failure: list[BaseException] = []

  def read():
    try:
      for line in lines:
        waiting.put(line)
    except BaseException as error:
      failure.append(error)
    waiting.put(_END)

  threading.Thread(target=read, daemon=True).start()
  while True:
    item = waiting.get()
    if item is _END:
      break
    batch = [item]
    while len(batch) < size:
      try:
        item = waiting.get_nowait()
      except queue.Empty:
        break
      if item is _END:
        waiting.put(_END)
        break
      batch.append(item)
    yield batch
  if failure:
    raise failure[0]


def input_lines(args) -> Iterator[str]:
  if args.text:
    yield from map(argument_text, args.text)
    return
  if args.file:
    path = Path(args.file)
    if path.is_dir():
      raise UserError(f"--file {path} is a directory: give a text file, one sentence a line")
    if not path.exists():  # a stream (/dev/stdin, a named pipe) is read like a file
      raise MissingFile(f"{path} does not exist: give an existing text file to --file")
    with open(path, "rb") as f:
      yield from decoded_lines(f, str(path))
    return
  if sys.stdin is None or sys.stdin.closed:
    raise UserError("no input: stdin is closed; pass sentences as arguments or --file")
  yield from decoded_lines(sys.stdin.buffer, "stdin")


def parse_args(argv=None):
  parser = ArgumentParser(
    prog="python -m transformer.translate",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("text", nargs="*", help="sentences; none: read --file or stdin, one a line")
  parser.add_argument("--workdir", required=True, help="a run directory written by training")
  add_model_arguments(parser)
  parser.add_argument("--file", help="a text file with one sentence per line")
  parser.add_argument("--batch_size", type=positive_int, default=64)
  add_threads_argument(parser)
  parser.add_argument(
    "--max_extra_tokens",
    type=int,
    help="a translation has at most len(source) + this many pieces (default: the run's)",
  )
  # Defaults of None: a flag given to a run of the other kind is refused (`check_flags`).
  lm = "lm runs only"
  parser.add_argument("--max_new_tokens", type=positive_int, help=f"{lm} (default: 40)")
  parser.add_argument("--temperature", type=float, help=f"{lm}; 0 = greedy (default: 1.0)")
  parser.add_argument("--top_k", type=positive_int, help=lm)
  parser.add_argument("--top_p", type=float, help=lm)
  parser.add_argument(
    "--seed", type=int, help=f"{lm}; line i uses seed + i - 1, past 2^63 - 2 from 0 (default: 0)"
  )
  args = parser.parse_args(argv)
  if args.text and args.file is not None:  # the arguments were translated, the file ignored
    parser.error("give sentences as arguments or --file, not both")
  return args


def check_flags(args: argparse.Namespace, task: str) -> None:
  """An error for a flag the run's kind does not take: an lm run samples (no beam search), a
  translation run searches (no sampling). Refused rather than warned about: its output would
  not be what the flag asked for, and a warning is easily lost in a pipeline."""
  others: tuple[str, ...]
  if task == "translation":
    others, takes = SAMPLING_FLAGS, "lm runs (sampling)"
  else:
    others, takes = SEARCH_FLAGS, "translation runs (beam search)"
  for name in others:
    if getattr(args, name) is not None:
      raise UserError(
        f"--{name} is for {takes}; {args.workdir} holds a {task!r} model: leave --{name} out"
      )


def main(argv=None) -> None:
  args = parse_args(argv)
  use_cores(args.threads)
  compilation_cache.enable()
  keep_freed_memory()  # each decoding step's buffers without page faults
  freeze_imported_objects()
  translator = Translator(args.workdir, step=args.step, average=args.average)
  if translator.task == "mlm":
    raise UserError(
      f"{args.workdir} holds a masked language model, which neither translates "
      "nor generates: use a translation or lm run"
    )
  check_flags(args, translator.task)
  search = translator.search.overridden(
    beam_size=args.beam_size,
    alpha=args.alpha,
    max_extra_tokens=args.max_extra_tokens,
    stop=args.stop,
  )
  if translator.task == "translation":  # before any input is read
    check_beam_positions(search.beam_size, translator.spec.model)
  for name, default in SAMPLING_DEFAULTS.items():
    if getattr(args, name) is None:
      setattr(args, name, default)
  printed = 0
  for batch in batches(input_lines(args), args.batch_size):
    check_stopped()  # a stop whose raise a finalizer swallowed ends here, not after the input
    if translator.task == "translation":
      outputs = translator.translate(
        batch,
        beam_size=search.beam_size,
        alpha=search.alpha,
        max_extra_tokens=search.max_extra_tokens,
        stop=search.stop,
        first_line=printed + 1,
      )
    else:
      outputs = translator.continue_text(
        batch,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=nth_seed(args.seed, printed),
        first_line=printed + 1,
      )
    for line in outputs:
      emit(line)
    printed += len(batch)
  if not printed:
    raise UserError("no input text: pass sentences as arguments, --file, or on stdin")


def main_cli() -> int:
  """The `transformer-translate` command: errors as one line and exit 2, no traceback."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  return run_cli(main, command=True)


if __name__ == "__main__":
  sys.exit(main_cli())
