"""A trained run ready to use: translating (or, for a language model, continuing) text.

from transformer import Translator
translator = Translator("runs/default")             # its exported model (WORKDIR/model)
translator.translate(["A dog runs on the beach."])  # the run's beam size and length penalty
Translator("runs/default", step=600)                 # or a checkpoint, or average=5
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import MAX_SEED
from transformer.data.pipeline import padded
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.decode.batch import padded_length
from transformer.decode.config import DecodeConfig
from transformer.decode.engine import Engine
from transformer.decode.sampling import sample
from transformer.errors import UserError
from transformer.model.transformer import DecoderOnly, EncoderDecoder
from transformer.runs.loading import load_run

log = logging.getLogger(__name__)


def check_texts(texts: object) -> None:
  """A list (or tuple) of strings, or a TypeError that says so: a bare string would be
  translated character by character, and anything else fails deep inside the tokenizer."""
  if isinstance(texts, str) or not isinstance(texts, list | tuple):
    raise TypeError(f"texts must be a list of str, got {type(texts).__name__}: wrap one in [...]")
  odd = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
  if odd is not None:
    raise TypeError(f"texts must be a list of str; texts[{odd}] is {type(texts[odd]).__name__}")


class Translator:
  """A run's model and tokenizer, loaded for use (see `transformer.runs.loading.load_run`).

  Args:
    workdir: a run directory written by training.
    step: use checkpoint `step` instead of the exported model.
    average: use the mean of the newest `average` checkpoints instead.
  """

  def __init__(self, workdir: str | Path, *, step: int | None = None, average: int | None = None):
    loaded = load_run(workdir, step=step, average=average)
    self.spec, self.tokenizer, self.model = loaded.spec, loaded.tokenizer, loaded.model
    self.source = loaded.source

  @property
  def search(self) -> DecodeConfig:
    """The beam size, length penalty and length limit the run was scored with."""
    return self.spec.search

  @functools.cached_property
  def engine(self) -> Engine:
    """The translation model's search engine (made once: a `Translator`'s model stays as
    loaded)."""
    return Engine(self.encoder_decoder)

  @property
  def task(self) -> str:
    return self.spec.task

  @property
  def encoder_decoder(self) -> EncoderDecoder:
    """The model, if it translates."""
    if not isinstance(self.model, EncoderDecoder):
      raise UserError(f"the run holds a {self.task!r} model: translating needs a translation run")
    return self.model

  @property
  def decoder_only(self) -> DecoderOnly:
    """The model, if it continues text."""
    if not isinstance(self.model, DecoderOnly):
      raise UserError(f"the run holds a {self.task!r} model: continuing text needs an lm run")
    return self.model

  @property
  def max_source_tokens(self) -> int:
    """The longest source, EOS included: the training length, within the model's positions."""
    return self.spec.max_source_tokens

  def encode(self, texts: list[str], line_numbers: list[int] | None = None) -> np.ndarray:
    """Source ids [B, S] of the texts, each + EOS, PAD-padded to a multiple of 8 within the
    model's positions; a text over `max_source_tokens` is cut with a warning, and pieces
    outside the vocabulary (emoji, scripts unseen in training: they become <unk>) are noted.
    `line_numbers` name the texts in those warnings (default 1, 2, ...)."""
    rows = []
    numbers = line_numbers or list(range(1, len(texts) + 1))
    for number, ids in zip(numbers, self.tokenizer.encode(texts), strict=True):
      unknown = ids.count(UNK_ID)
      if unknown:
        log.warning(
          "input line %d: %d of its %d pieces are outside the vocabulary (<unk>); "
          "the translation will miss them",
          number,
          unknown,
          len(ids),
        )
      if len(ids) + 1 > self.max_source_tokens:
        log.warning(
          "input line %d has %d tokens; only the first %d are translated",
          number,
          len(ids),
          self.max_source_tokens - 1,
        )
        ids = ids[: self.max_source_tokens - 1]
      rows.append([*ids, EOS_ID])
    return padded(rows, padded_length(max(len(r) for r in rows), self.spec.model.max_len))

  def translate(
    self,
    texts: list[str],
    *,
    beam_size: int | None = None,
    alpha: float | None = None,
    max_extra_tokens: int | None = None,
    stop: str | None = None,
    first_line: int = 1,
  ) -> list[str]:
    """One translation per text; a blank text gets a blank translation. The search settings
    default to the run's own (`self.search`, its decode block); `first_line` numbers the texts
    in warnings (the line of a file they came from)."""
    check_texts(texts)
    search = self.search.overridden(
      beam_size=beam_size, alpha=alpha, max_extra_tokens=max_extra_tokens, stop=stop
    )
    real = [i for i, text in enumerate(texts) if text.strip()]
    out = [""] * len(texts)
    if not real:
      return out
    src_ids_BS = self.encode([texts[i] for i in real], [first_line + i for i in real])
    tokens_BT = self.engine.search([ids[ids != PAD_ID] for ids in src_ids_BS], search)
    for i, text in zip(real, self.tokenizer.decode(tokens_BT), strict=True):
      out[i] = text
    return out

  def continue_text(
    self,
    texts: list[str],
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
  ) -> list[str]:
    """Samples a continuation of each prompt from a decoder-only model (one prompt at a time:
    a batch of prompts would have to share one length). A model of running text (dataset text)
    reads the prompt as it is (an empty one as a document's start) and continues it past its
    context by sliding the context along, as nanoGPT's sample.py does; a model of sentences
    reads BOS first and stops at its context."""
    check_texts(texts)
    check_sampling(len(texts), max_new_tokens, temperature, seed)
    draw = functools.partial(
      sample, self.decoder_only, temperature=temperature, top_k=top_k, top_p=top_p
    )
    context = self.spec.model.max_len
    outputs = []
    for i, text in enumerate(texts):
      key = jax.random.key(seed + i)
      ids = self.tokenizer.encode([text])[0]
      if self.spec.running_text:
        new = slide(draw, ids or [EOS_ID], max_new_tokens, context, key)
      else:
        new = continue_sentence(draw, [BOS_ID, *ids], max_new_tokens, context, key, i + 1)
      outputs.append(self.tokenizer.decode([new])[0])
    return outputs


def check_sampling(count: int, max_new_tokens: int, temperature: float, seed: int) -> None:
  """One line for settings that cannot sample `count` prompts."""
  if max_new_tokens < 1:
    raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= seed <= MAX_SEED - count:
    raise UserError(f"--seed must be in [0, {MAX_SEED - count}], got {seed}")
  if not (math.isfinite(temperature) and temperature >= 0):  # NaN sampled garbage silently
    raise UserError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}")


def continue_sentence(
  draw: Callable, ids: list[int], max_new_tokens: int, context: int, key, number: int
) -> list[int]:
  """Up to `max_new_tokens` ids after a sentence's `ids` (BOS first), within the model's
  `context` positions; prompt `number` (from 1) too long for it is one line."""
  # The last new token is never fed back: T + new - 1 positions must fit in the context.
  budget = min(max_new_tokens, context + 1 - len(ids))
  if budget <= 0:
    raise UserError(
      f"prompt {number} has {len(ids)} tokens (BOS included) and the model "
      f"reads at most {context}: shorten it"
    )
  out = draw(jnp.asarray([ids], jnp.int32), max_new_tokens=budget, rng=key)
  return [int(t) for t in np.asarray(out)[0, len(ids) :]]


def slide(draw: Callable, ids: list[int], max_new_tokens: int, context: int, key) -> list[int]:
  """Up to `max_new_tokens` ids after running text `ids`, each call reading the last
  half-context of what is there and adding up to the other half (two shapes to compile); stops
  at EOS."""
  new: list[int] = []
  call = 0
  while len(new) < max_new_tokens:
    prompt = (ids + new)[-max(context // 2, 1) :]
    count = min(max_new_tokens - len(new), context + 1 - len(prompt))
    out = draw(
      jnp.asarray([prompt], jnp.int32), max_new_tokens=count, rng=jax.random.fold_in(key, call)
    )
    added = [int(t) for t in np.asarray(out)[0, len(prompt) :]]
    if EOS_ID in added:
      return new + added[: added.index(EOS_ID)]
    new += added
    call += 1
  return new
