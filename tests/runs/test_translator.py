"""The translate CLI's Translator: source padding within max_len, the sampling budget of a prompt.

Random tiny models with conftest's tokenizer stand in for trained runs.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import DecoderOnly, EncoderDecoder, TransformerConfig
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.decode import beam_search, greedy_decode
from transformer.decode.config import DecodeConfig
from transformer.inspect import attention as visualize
from transformer.runs import translator as translate_module
from transformer.runs.translator import Translator

MAX_LEN = 21  # not a multiple of 8: rounding a source up to one would pass the last position
LONG_TEXT = " ".join(["a man with a red hat"] * 6)


@pytest.fixture(scope="module")
def translator(tmp_path_factory, tokenizer, write_run):
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=MAX_LEN)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  workdir = write_run(
    tmp_path_factory.mktemp("translation"),
    model,
    tokenizer,
    task="translation",
    data_max_length=MAX_LEN,
  )
  return Translator(workdir)


def test_longest_source_fills_max_len_and_translates_to_finite_scores(translator):
  assert len(translator.tokenizer.encode([LONG_TEXT])[0]) > MAX_LEN
  src_BS = translator.encode([LONG_TEXT, "a dog"])
  # Cut to MAX_LEN - 1 pieces + EOS; padded to MAX_LEN, not to the next multiple of 8 (24).
  assert src_BS.shape == (2, MAX_LEN)
  assert src_BS[0, -1] == EOS_ID and np.all(src_BS[0] != PAD_ID)
  _, scores_BW = beam_search(
    translator.model, jnp.asarray(src_BS), max_new_tokens=MAX_LEN, beam_size=2
  )
  assert np.all(np.isfinite(np.asarray(scores_BW))), scores_BW
  assert len(translator.translate([LONG_TEXT], beam_size=2)) == 1


def test_visualised_sentence_near_max_len_is_padded_within_it(translator):
  """A sentence of 17..21 pieces would round up to 24 source positions."""
  words = LONG_TEXT.split()
  text = next(
    " ".join(words[:n])
    for n in range(len(words), 0, -1)
    if len(translator.tokenizer.encode([" ".join(words[:n])])[0]) + 1 <= MAX_LEN
  )
  assert len(translator.tokenizer.encode([text])[0]) + 1 > 16
  sentence = visualize.prepare_sentence(
    translator.model,
    translator.tokenizer,
    text,
    max_source_tokens=MAX_LEN,
    search=DecodeConfig(beam_size=1, max_extra_tokens=MAX_LEN),
  )
  # Padding changes nothing, so the translation is greedy decoding of the unpadded source.
  tokens = list(
    np.asarray(
      greedy_decode(translator.model, jnp.asarray([sentence.src_ids]), max_new_tokens=MAX_LEN)
    )[0]
  )
  tokens = tokens[: tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
  assert sentence.tgt_in_ids[1:] == tokens[: MAX_LEN - 1]
  logits_BTV, _ = visualize.collect_attention(
    translator.model, np.array([sentence.src_ids]), np.array([sentence.tgt_in_ids])
  )
  assert np.all(np.isfinite(logits_BTV))


def test_prompt_of_max_len_tokens_still_gets_one_new_token(
  tmp_path, tokenizer, write_run, monkeypatch
):
  """sample feeds T + new - 1 positions (the last token is never fed back), so a prompt of
  max_len tokens (BOS included) has room for exactly one more; one token longer is an error."""
  text = "a man with a red hat"
  prompt_length = len(tokenizer.encode([text])[0]) + 1  # with BOS
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=prompt_length)
  workdir = write_run(
    tmp_path,
    DecoderOnly(config, rngs=nnx.Rngs(0)),
    tokenizer,
    task="lm",
    data_max_length=prompt_length,
  )
  lm = Translator(workdir)
  budgets, real_sample = [], translate_module.sample

  def recording_sample(*args, max_new_tokens, **kwargs):
    budgets.append(max_new_tokens)
    return real_sample(*args, max_new_tokens=max_new_tokens, **kwargs)

  monkeypatch.setattr(translate_module, "sample", recording_sample, raising=True)
  options = dict(max_new_tokens=5, temperature=0.0, top_k=None, top_p=None, seed=0)
  assert len(lm.continue_text([text], **options)) == 1
  assert budgets == [1]
  shorter_length = len(tokenizer.encode(["a man with a red"])[0]) + 1
  assert prompt_length - 5 < shorter_length < prompt_length
  lm.continue_text(["a man with a red"], **options)
  assert budgets == [1, prompt_length + 1 - shorter_length]
  longer_length = len(tokenizer.encode([text + " dog"])[0]) + 1
  assert longer_length > prompt_length
  with pytest.raises(
    ValueError,
    match=rf"has {longer_length} tokens \(BOS included\) and the model reads at most "
    rf"{prompt_length}: shorten it",
  ):
    lm.continue_text([text + " dog"], **options)


@pytest.mark.parametrize(
  "options, message",
  [
    (dict(temperature=float("nan")), "--temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "--temperature must be a finite number >= 0"),
    (dict(seed=2**64), "--seed must be in [0, "),
    (dict(seed=-1), "--seed must be in [0, "),
  ],
)
def test_sampling_settings_that_mean_nothing_are_refused(
  options, message, tmp_path, tokenizer, write_run
):
  """A NaN temperature sampled garbage without a word; a seed past 2^63 was an OverflowError."""
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size)
  workdir = write_run(
    tmp_path, DecoderOnly(config, rngs=nnx.Rngs(0)), tokenizer, task="lm", data_max_length=32
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    Translator(workdir).continue_text(["a man"], max_new_tokens=2, **options)
