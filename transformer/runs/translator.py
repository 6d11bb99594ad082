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
import numbers
from collections.abc import Callable, Iterator, Sequence
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
from transformer.model.config import TransformerConfig
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


def check_whole(**values: object) -> None:
  """A one-line error for a count or seed (None: the default) that is not a whole number: a
  float reached JAX as a shape and failed deep inside it, and a bool is an int to Python, so
  top_k=True sampled greedily without a word."""
  for name, value in values.items():
    if value is not None and (is_bool(value) or not isinstance(value, numbers.Integral)):
      raise UserError(f"{name} must be a whole number (int), got {type(value).__name__} {value!r}")


def check_real(**values: object) -> None:
  """A one-line error for a setting (None: the default) that is not a real number."""
  for name, value in values.items():
    if value is not None and (is_bool(value) or not isinstance(value, numbers.Real)):
      raise UserError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def is_bool(value: object) -> bool:
  return isinstance(value, bool | np.bool_)


def check_32_bit_mode() -> None:
  """Refuses JAX's 64-bit mode (JAX_ENABLE_X64=1, or jax_enable_x64 set by a program): the
  models and their searches compute in float32 and int32, and under it a search's loop carried
  float64 scores where it took float32 ones and failed with JAX's TypeError."""
  if jax.config.read("jax_enable_x64"):
    raise UserError(
      "JAX's 64-bit mode is on (JAX_ENABLE_X64 or jax_enable_x64): decoding computes in "
      "float32 and does not run under it: unset JAX_ENABLE_X64 (or set it to 0)"
    )


def check_beam_positions(beam_size: int, config: TransformerConfig) -> None:
  """Beam search feeds a sentence's beams to the decoder as one row of `beam_size` positions
  (one cache shared by the beams, `beam_search._next_log_probs`), and sinusoidal or learned
  positions are checked against the `max_len` they cover: more beams than that stopped deep in
  the model with an error about the input's length. RoPE has no such table."""
  if config.position != "rope" and beam_size > config.max_len:
    raise UserError(
      f"--beam_size {beam_size} exceeds the model's {config.max_len} positions (model.max_len): "
      f"its beams are decoded side by side as positions of one row; use --beam_size "
      f"{config.max_len} or less"
    )


def note_unknown(ids: Sequence[int], what: str, consequence: str) -> None:
  """One warning when some of a text's pieces are outside the vocabulary (emoji, scripts unseen
  in training: they become <unk>), which the model cannot read; `what` names the text."""
  unknown = list(ids).count(UNK_ID)
  if unknown:
    log.warning(
      "%s: %d of its %d pieces are outside the vocabulary (<unk>); %s",
      what,
      unknown,
      len(ids),
      consequence,
    )


class Translator:
  """A run's model and tokenizer, loaded for use (see `transformer.runs.loading.load_run`).

  Args:
    workdir: a run directory written by training.
    step: use checkpoint `step` instead of the exported model.
    average: use the mean of the newest `average` checkpoints instead.
  """

  def __init__(self, workdir: str | Path, *, step: int | None = None, average: int | None = None):
    check_32_bit_mode()
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
      note_unknown(ids, f"input line {number}", "the translation will miss them")
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
    check_whole(beam_size=beam_size, max_extra_tokens=max_extra_tokens, first_line=first_line)
    check_real(alpha=alpha)
    search = self.search.overridden(
      beam_size=beam_size, alpha=alpha, max_extra_tokens=max_extra_tokens, stop=stop
    )
    check_beam_positions(search.beam_size, self.spec.model)
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
    first_line: int = 1,
  ) -> list[str]:
    """Samples a continuation of each prompt from a decoder-only model (one prompt at a time:
    a batch of prompts would have to share one length), prompt i with seed + i. A model of
    running text (dataset text) reads the prompt as it is (an empty one as a document's start)
    and continues it past its context by sliding the context along, as nanoGPT's sample.py
    does; a model of sentences reads BOS first and stops at its context. Each continuation is
    the text that follows its prompt, so it starts with a space where its first piece starts a
    word; `first_line` numbers the prompts in warnings and errors."""
    return list(
      self.continuations(
        texts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        first_line=first_line,
      )
    )

  def continuations(
    self,
    texts: list[str],
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    first_line: int = 1,
  ) -> Iterator[str]:
    """`continue_text`'s continuations one at a time, each as soon as it is drawn. The settings
    are checked, and the prompts' unknown pieces noted (once per distinct prompt), before the
    first is drawn: a command prints nothing it would have to take back."""
    check_texts(texts)
    check_whole(max_new_tokens=max_new_tokens, top_k=top_k, seed=seed, first_line=first_line)
    check_real(temperature=temperature, top_p=top_p)
    check_sampling(max_new_tokens, temperature, seed)
    draw = functools.partial(
      sample, self.decoder_only, temperature=temperature, top_k=top_k, top_p=top_p
    )
    prompts = self.tokenizer.encode(texts)
    noted: set[str] = set()
    numbers = range(first_line, first_line + len(texts))
    for number, text, ids in zip(numbers, texts, prompts, strict=True):
      if text not in noted:
        note_unknown(ids, f"prompt {number}", "the model reads each as one unknown piece")
        noted.add(text)
    return self._continue(draw, prompts, max_new_tokens, seed, first_line)

  def _continue(
    self, draw: Callable, prompts: list[list[int]], max_new_tokens: int, seed: int, first: int
  ) -> Iterator[str]:
    context = self.spec.model.max_len
    for i, ids in enumerate(prompts):
      key = jax.random.key(nth_seed(seed, i))
      if self.spec.running_text:
        new = slide(draw, ids or [EOS_ID], max_new_tokens, context, key)
      else:
        new = continue_sentence(draw, [BOS_ID, *ids], max_new_tokens, context, key, first + i)
      yield self.text_after(ids, new)

  def text_after(self, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of `new_ids` as it follows `prompt_ids`: SentencePiece drops the space a word's
    first piece ("\u2581Hund") stands for at the start of a text, so a continuation decoded
    alone lost the space between the prompt and a new word ("Ein Hund" + "Fu\u00dfball")."""
    whole, head = self.tokenizer.decode([[*prompt_ids, *new_ids], prompt_ids])
    if whole.startswith(head):
      return whole[len(head) :]
    return self.tokenizer.decode([new_ids])[0]  # (no tokenizer here decodes otherwise)


def nth_seed(seed: int, i: int) -> int:
  """The seed prompt (or sample) i is drawn with: seed + i, past the largest seed JAX takes
  counting on from 0, so that any seed serves any number of prompts (a stream of unknown
  length, as `translate` reads from stdin)."""
  return (seed + i) % (MAX_SEED + 1)


def check_sampling(max_new_tokens: int, temperature: float, seed: int) -> None:
  """One line for settings that cannot sample (any number of prompts: the seeds wrap)."""
  if max_new_tokens < 1:
    raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= seed <= MAX_SEED:
    raise UserError(f"--seed must be in [0, {MAX_SEED}] (jax.random.key's seeds), got {seed}")
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
