"""Translating (or, for a language model, continuing) text with a trained run's workdir."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transformer.data.tokenizer import BOS_ID, EOS_ID, MODEL_FILENAME, PAD_ID, Tokenizer
from transformer.decode.batch import padded_length, translate_ids
from transformer.decode.sampling import sample
from transformer.train.config import model_config
from transformer.train.models import create_model, load_params_into

log = logging.getLogger(__name__)


class Translator:
  """A run's tokenizer and latest parameters, ready to decode batches of sentences."""

  def __init__(self, workdir: str | Path):
    workdir = Path(workdir)
    config_file, tokenizer_file = workdir / "config.json", workdir / MODEL_FILENAME
    for path, what in ((config_file, "config"), (tokenizer_file, "tokenizer")):
      if not path.exists():
        raise FileNotFoundError(f"{path} is missing: --workdir must be a directory that "
                                f"train.py has written (no {what} found)")
    self.config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    self.tokenizer = Tokenizer(tokenizer_file)
    self.model = create_model(self.config.task, model_config(self.config), seed=0)
    load_params_into(self.model, workdir)
    self.model.eval()

  @property
  def max_source_tokens(self) -> int:
    """The longest source, EOS included: the training length, within the model's positions."""
    return min(self.config.data.max_length, self.config.model.max_len)

  def encode(self, texts: list[str]) -> np.ndarray:
    """Source ids [B, S] (EOS-terminated, PAD-padded); over-long texts are cut with a warning."""
    for i, text in enumerate(texts):
      if not text.strip():
        raise ValueError(f"input line {i + 1} is empty: give one non-empty sentence per line")
    rows = []
    for i, ids in enumerate(self.tokenizer.encode(texts)):
      if len(ids) + 1 > self.max_source_tokens:
        log.warning("input line %d has %d tokens; only the first %d are translated", i + 1,
                    len(ids), self.max_source_tokens - 1)
        ids = ids[: self.max_source_tokens - 1]
      rows.append(list(ids) + [EOS_ID])
    length = padded_length(max(len(r) for r in rows), self.config.model.max_len)
    return np.array([r + [PAD_ID] * (length - len(r)) for r in rows], np.int32)

  def translate(self, texts: list[str], *, beam_size: int = 4, alpha: float = 0.6,
                max_extra_length: int = 50) -> list[str]:
    src_ids_BS = jnp.asarray(self.encode(texts))
    tokens_BT = translate_ids(self.model, src_ids_BS, beam_size=beam_size, alpha=alpha,
                              max_extra_length=max_extra_length)
    return self.tokenizer.decode(np.asarray(tokens_BT))

  def continue_text(self, texts: list[str], *, max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, seed: int) -> list[str]:
    """Samples continuations of prompts from a decoder-only model (one prompt at a time when
    their token counts differ, since a batch of prompts must share one length)."""
    outputs = []
    for i, text in enumerate(texts):
      ids = [BOS_ID] + self.tokenizer.encode([text])[0]
      # The last new token is never fed back: T + new - 1 positions must fit in max_len.
      budget = min(max_new_tokens, self.config.model.max_len + 1 - len(ids))
      if budget <= 0:
        raise ValueError(f"prompt {i + 1} has {len(ids)} tokens, the model's limit is "
                         f"{self.config.model.max_len}: shorten it")
      out = sample(self.model, jnp.asarray([ids], jnp.int32), max_new_tokens=budget,
                   rng=jax.random.key(seed + i), temperature=temperature, top_k=top_k,
                   top_p=top_p)
      outputs.append(self.tokenizer.decode(np.asarray(out)[:, len(ids):])[0])
    return outputs


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
  parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
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
  task = translator.config.task
  if task == "mlm":
    raise ValueError(f"{args.workdir} holds a masked language model, which neither translates "
                     "nor generates: use a translation or lm run")
  for start in range(0, len(texts), args.batch_size):
    chunk = texts[start:start + args.batch_size]
    if task == "translation":
      outputs = translator.translate(chunk, beam_size=args.beam_size, alpha=args.alpha)
    else:
      outputs = translator.continue_text(chunk, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k,
                                         top_p=args.top_p, seed=args.seed + start)
    for line in outputs:
      print(line, flush=True)
