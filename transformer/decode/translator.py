"""A trained run ready to use: translating (or, for a language model, continuing) text."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from transformer.data.tokenizer import BOS_ID, EOS_ID, MODEL_FILENAME, PAD_ID, Tokenizer
from transformer.decode.batch import padded_length, translate_ids
from transformer.decode.sampling import sample
from transformer.model.transformer import DecoderOnly, EncoderDecoder, create_model
from transformer.runs.loading import load_params_into
from transformer.runs.spec import read_spec

log = logging.getLogger(__name__)


class Translator:
  """A run's tokenizer and latest parameters, ready to decode batches of sentences."""

  def __init__(self, workdir: str | Path):
    workdir = Path(workdir)
    self.spec = read_spec(workdir)
    tokenizer_file = workdir / MODEL_FILENAME
    if not tokenizer_file.exists():
      raise FileNotFoundError(
        f"{tokenizer_file} is missing: --workdir must be a directory that "
        "training has written (no tokenizer found)"
      )
    self.tokenizer = Tokenizer(tokenizer_file)
    self.model = create_model(self.spec.task, self.spec.model, seed=0)
    load_params_into(self.model, workdir)
    self.model.eval()

  @property
  def task(self) -> str:
    return self.spec.task

  @property
  def encoder_decoder(self) -> EncoderDecoder:
    """The model, if it translates."""
    if not isinstance(self.model, EncoderDecoder):
      raise ValueError(f"the run holds a {self.task!r} model: translating needs a translation run")
    return self.model

  @property
  def decoder_only(self) -> DecoderOnly:
    """The model, if it continues text."""
    if not isinstance(self.model, DecoderOnly):
      raise ValueError(f"the run holds a {self.task!r} model: continuing text needs an lm run")
    return self.model

  @property
  def max_source_tokens(self) -> int:
    """The longest source, EOS included: the training length, within the model's positions."""
    return self.spec.max_source_tokens

  def encode(self, texts: list[str]) -> np.ndarray:
    """Source ids [B, S] (EOS-terminated, PAD-padded); over-long texts are cut with a warning."""
    for i, text in enumerate(texts):
      if not text.strip():
        raise ValueError(f"input line {i + 1} is empty: give one non-empty sentence per line")
    rows = []
    for i, ids in enumerate(self.tokenizer.encode(texts)):
      if len(ids) + 1 > self.max_source_tokens:
        log.warning(
          "input line %d has %d tokens; only the first %d are translated",
          i + 1,
          len(ids),
          self.max_source_tokens - 1,
        )
        ids = ids[: self.max_source_tokens - 1]
      rows.append(list(ids) + [EOS_ID])
    length = padded_length(max(len(r) for r in rows), self.spec.model.max_len)
    return np.array([r + [PAD_ID] * (length - len(r)) for r in rows], np.int32)

  def translate(
    self, texts: list[str], *, beam_size: int = 4, alpha: float = 0.6, max_extra_length: int = 50
  ) -> list[str]:
    src_ids_BS = jnp.asarray(self.encode(texts))
    tokens_BT = translate_ids(
      self.encoder_decoder,
      src_ids_BS,
      beam_size=beam_size,
      alpha=alpha,
      max_extra_length=max_extra_length,
    )
    return self.tokenizer.decode(np.asarray(tokens_BT))

  def continue_text(
    self,
    texts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
  ) -> list[str]:
    """Samples continuations of prompts from a decoder-only model (one prompt at a time when
    their token counts differ, since a batch of prompts must share one length)."""
    outputs = []
    for i, text in enumerate(texts):
      ids = [BOS_ID] + self.tokenizer.encode([text])[0]
      # The last new token is never fed back: T + new - 1 positions must fit in max_len.
      budget = min(max_new_tokens, self.spec.model.max_len + 1 - len(ids))
      if budget <= 0:
        raise ValueError(
          f"prompt {i + 1} has {len(ids)} tokens, the model's limit is "
          f"{self.spec.model.max_len}: shorten it"
        )
      out = sample(
        self.decoder_only,
        jnp.asarray([ids], jnp.int32),
        max_new_tokens=budget,
        rng=jax.random.key(seed + i),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
      )
      outputs.append(self.tokenizer.decode(np.asarray(out)[:, len(ids) :])[0])
    return outputs
