"""The slot engine (`search_all`) against the search of each sentence on its own, and the early
stop of a K = 1 search against the full W-best search."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.decode import beam_search, greedy_decode
from transformer.decode.batch import length_limits, search_length
from transformer.decode.config import DecodeConfig
from transformer.decode.engine import Engine, _programs, refill_widths, search_all

MAX_EXTRA = 3


def settings(beam_size: int, alpha: float) -> DecodeConfig:
  return DecodeConfig(beam_size=beam_size, alpha=alpha, max_extra_tokens=MAX_EXTRA)


def sources_of(src_BS) -> list[np.ndarray]:
  return [row[row != PAD_ID] for row in np.asarray(src_BS)]


def alone(model, source: np.ndarray, beam_size: int, alpha: float) -> np.ndarray:
  """The translation of one sentence searched by itself: greedy, or the best of a W-best
  search run to its end (every hypothesis settled)."""
  src_1S = jnp.asarray(source[None], jnp.int32)
  max_new = min(len(source) + MAX_EXTRA, model.config.max_len)
  if beam_size == 1:
    return np.asarray(greedy_decode(model, src_1S, max_new_tokens=max_new))[0]
  tokens_1WT, _ = beam_search(
    model, src_1S, max_new_tokens=max_new, beam_size=beam_size, alpha=alpha
  )
  return np.asarray(tokens_1WT)[0, 0]


def trimmed(tokens: np.ndarray) -> list[int]:
  tokens = [int(t) for t in tokens if t != PAD_ID]
  return tokens[: tokens.index(EOS_ID) + 1] if EOS_ID in tokens else tokens


@pytest.mark.parametrize(
  "beam_size, alpha, slots, count", [(1, 0.0, 4, 10), (3, 0.6, 4, 10), (2, 1.0, 16, 24)]
)
def test_search_all_translates_each_sentence_as_its_own_search(
  copy_model, beam_size, alpha, slots, count
):
  """Sentences through `slots` slots, any 2 free ones refilled at once (16 slots: two groups of
  8 attending over their own prefixes, sentences of different ages in each): each slot's
  sentence is searched at its own position in a shared cache, and must come out as if
  searched alone."""
  rng = np.random.default_rng(3)
  sources = [np.append(rng.integers(EOS_ID + 2, 16, n), EOS_ID) for n in rng.integers(1, 9, count)]
  got = search_all(copy_model, sources, settings(beam_size, alpha), slots=slots, refill=2)
  assert got.shape[0] == len(sources)
  for source, row in zip(sources, got, strict=True):
    assert trimmed(row) == trimmed(alone(copy_model, source, beam_size, alpha)), source


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_a_search_for_the_best_stops_early_and_finds_the_same_best(alpha):
  """K = 1 stops a sentence once its best is certain; the W-best search runs on. A random
  model (long, uncertain hypotheses) and a short limit leave finished and cut-off hypotheses
  competing."""
  model = EncoderDecoder(TransformerConfig.tiny(tie_output=False), rngs=nnx.Rngs(1))
  src_BS = jnp.asarray(np.random.default_rng(4).integers(5, 64, (6, 5)), jnp.int32)
  full_BWT, full_BW = beam_search(
    model, src_BS, max_new_tokens=6, beam_size=4, alpha=alpha, eos_id=7
  )
  best_B1T, best_B1 = beam_search(
    model, src_BS, max_new_tokens=6, beam_size=4, alpha=alpha, eos_id=7, num_results=1
  )
  np.testing.assert_array_equal(best_B1T[:, 0], full_BWT[:, 0])
  np.testing.assert_allclose(best_B1[:, 0], full_BW[:, 0], rtol=1e-6)


def test_a_sentences_limit_is_its_own(copy_model, copy_sources):
  """The limit is the sentence's own length + max_extra_tokens: searched beside a longer
  source, or padded further, a sentence gets the same translation."""
  limits_B = np.asarray(length_limits(copy_sources, MAX_EXTRA, 12, PAD_ID))
  lengths_B = np.sum(np.asarray(copy_sources) != PAD_ID, axis=1)
  np.testing.assert_array_equal(limits_B, np.minimum(lengths_B + MAX_EXTRA, 12))
  padded_BS = jnp.pad(copy_sources, ((0, 0), (0, 4)))
  for src_BS in (copy_sources, padded_BS):
    tokens_B1T, _ = beam_search(
      copy_model,
      src_BS,
      max_new_tokens=12,
      beam_size=2,
      alpha=0.6,
      num_results=1,
      max_new_tokens_B=length_limits(src_BS, MAX_EXTRA, 12, PAD_ID),
    )
    for source, row in zip(sources_of(copy_sources), np.asarray(tokens_B1T)[:, 0]):
      assert trimmed(row) == trimmed(alone(copy_model, source, 2, 0.6))


def test_lists_whose_longest_sentences_differ_a_little_share_the_compiled_search(copy_model):
  """Two lists (two test sets, one sentence then another) with longest sources of 17 and 30
  tokens search at one source length (32, `search_length`; rounded to multiples of 8 they
  were 24 and 32): one set of programs, and each list's translations are those of its
  sentences searched alone."""
  _programs.cache_clear()
  rng = np.random.default_rng(5)
  for longest in (17, 30):
    sources = [np.append(rng.integers(EOS_ID + 2, 16, n), EOS_ID) for n in (2, longest - 1)]
    got = search_all(copy_model, sources, settings(2, 0.6))
    for source, row in zip(sources, got, strict=True):
      assert trimmed(row) == trimmed(alone(copy_model, source, 2, 0.6)), source
  assert _programs.cache_info().misses == 1
  assert [search_length(n, 64) for n in (1, 8, 9, 33, 64)] == [8, 8, 16, 64, 64]
  assert search_length(40, 48) == 48  # never past the model's positions


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_list_within_one_group_is_searched_in_one_program(copy_model, beam_size):
  """Up to `refill` sentences (one sentence at a time, as `translate` is used interactively)
  fill one group: the whole search runs as `once`, without the refill loop's programs, and
  each translation is that of its sentence searched alone."""
  _programs.cache_clear()
  rng = np.random.default_rng(6)
  sources = [np.append(rng.integers(EOS_ID + 2, 16, n), EOS_ID) for n in (6, 2, 5)]
  engine = Engine(copy_model)
  got = engine.search(sources, settings(beam_size, 0.6))
  for source, row in zip(sources, got, strict=True):
    assert trimmed(row) == trimmed(alone(copy_model, source, beam_size, 0.6)), source
  (programs,) = engine._by_layout.values()
  assert programs.once._cache_size() == 1
  assert programs.run._cache_size() == programs.init._cache_size() == 0


def test_a_prepared_search_compiles_nothing_more(copy_model):
  """`prepare` runs a list's programs on empty slots; the search of the list then finds each
  compiled once (the state a refill or a step returns has the types `init` gives it: a weakly
  typed score there compiled `refill` and `run` twice)."""
  _programs.cache_clear()
  rng = np.random.default_rng(7)
  sources = [np.append(rng.integers(EOS_ID + 2, 16, n), EOS_ID) for n in rng.integers(1, 9, 12)]
  search = dict(slots=4, refill=2)
  engine = Engine(copy_model)
  engine.prepare(np.array([len(s) for s in sources]), settings(2, 0.6), **search)
  (programs,) = engine._by_layout.values()
  compiled = [p._cache_size() for p in (programs.init, programs.refill, programs.run)]
  got = engine.search(sources, settings(2, 0.6), **search)
  assert [p._cache_size() for p in (programs.init, programs.refill, programs.run)] == compiled
  # `refill` once per width its sentences are encoded at: 8 and 16 for slots of 16 ids.
  assert compiled == [1, len(refill_widths(16)), 1] == [1, 2, 1]
  for source, row in zip(sources, got, strict=True):
    assert trimmed(row) == trimmed(alone(copy_model, source, 2, 0.6)), source
