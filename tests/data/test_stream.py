"""The training stream over a token cache: every pair once an epoch, within the budget, in an
order fixed by (seed, epoch), resumable, split over processes, bucketed or packed.

The cache is built from synthetic ids ("5 17 9" -> [5, 17, 9]); pair i's source and target both
start with FIRST_ID + i, so a row tells which pairs it holds.
"""

import json

import numpy as np
import pytest

from transformer.data import batching
from transformer.data.batching import Layout, Share
from transformer.data.stream import TrainStream, language_model_stream, translation_stream
from transformer.data.token_cache import build_cache, open_cache
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.errors import UserError

FIRST_ID = 5
MAX_LENGTH = 48
BUCKETS = (8, 16, 24, 32, 48)
TOKENS = 512
NUM_PAIRS = 300


def fake_ids(n: int, max_len: int, seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [
    [FIRST_ID + i, *rng.integers(FIRST_ID, 400, rng.integers(0, max_len)).tolist()]
    for i in range(n)
  ]


def encode(texts: list[str]) -> list[list[int]]:
  return [[int(x) for x in text.split()] for text in texts]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  # Target lengths follow the source's, as a translation's do.
  sources, rng = fake_ids(NUM_PAIRS, 24, 1), np.random.default_rng(2)
  targets = [
    [FIRST_ID + i, *rng.integers(FIRST_ID, 400, max(len(s) + rng.integers(-3, 4), 0))]
    for i, s in enumerate(sources)
  ]
  sources[3], targets[7] = [], []  # empty sides: never trained on
  sources[10] = [FIRST_ID + 10, *range(100, 160)]  # longer than MAX_LENGTH: left out
  targets[20] = [FIRST_ID + 20, *range(100, 147)]  # 48 pieces + EOS: left out too
  text = [(" ".join(map(str, s)), " ".join(map(str, t))) for s, t in zip(sources, targets)]
  directory = tmp_path_factory.mktemp("cache") / "pairs"
  # Chunks of 128 pairs: written one after another into one file.
  chunks = [text[i : i + 128] for i in range(0, len(text), 128)]
  build_cache(directory, chunks, encode, vocab_size=500, built_from={"test": True})
  return open_cache(directory), sources, targets


def usable(cache):
  ids, counts = batching.usable_pairs(cache[0].lengths, MAX_LENGTH, truncate=False)
  return ids, counts


def stream(cache, packing=False, seed=0, multiple=4, prefetch=2, **shard) -> TrainStream:
  layout = Layout.of(
    max_len=MAX_LENGTH,
    packing=packing,
    tokens_per_batch=TOKENS,
    multiple=multiple,
    buckets=BUCKETS,
  )
  return translation_stream(
    cache[0], usable(cache)[0], layout, seed=seed, prefetch=prefetch, **shard
  )


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def epoch_batches(cache, packing=False) -> int:
  """Batches of one epoch, from the plan itself (one chunk here)."""
  layout = Layout.of(
    max_len=MAX_LENGTH, packing=packing, tokens_per_batch=TOKENS, multiple=4, buckets=BUCKETS
  )
  return len(batching.chunk_plan(usable(cache)[0], cache[0].lengths, layout, 0, 0, 0))


def with_eos(ids):
  return [*ids, EOS_ID]


def test_the_cache_holds_every_pair_in_order(cache):
  token_cache, sources, targets = cache
  assert len(token_cache) == NUM_PAIRS and token_cache.meta["shards"] == ["ids-00000.array_record"]
  np.testing.assert_array_equal(
    token_cache.lengths, [[len(s), len(t)] for s, t in zip(sources, targets)]
  )
  for i, (source, target) in zip((0, 3, 130, 299), token_cache.read([0, 3, 130, 299])):
    assert source.tolist() == sources[i] and target.tolist() == targets[i]


def test_usable_pairs_leave_out_empty_and_long_ones(cache):
  ids, counts = usable(cache)
  lengths = cache[0].lengths
  want = [i for i in range(NUM_PAIRS) if lengths[i].min() > 0 and lengths[i].max() + 1 <= 48]
  assert ids.tolist() == want
  assert counts == {
    "pairs": NUM_PAIRS,
    "empty": 2,
    "too_long": int((lengths.max(1) >= 48).sum()),
    "kept": len(want),
  }


@pytest.mark.parametrize("packing", [False, True])
def test_an_epoch_holds_every_usable_pair_once_within_the_budget(cache, packing):
  _, sources, targets = cache
  seen = []
  for batch in take(stream(cache, packing), epoch_batches(cache, packing)):
    inputs, outputs = batch["inputs"], batch["targets"]
    assert inputs.dtype == outputs.dtype == np.int32 and inputs.shape == outputs.shape
    assert inputs.size <= TOKENS and inputs.shape[0] % 4 == 0
    assert inputs.shape[1] == MAX_LENGTH if packing else inputs.shape[1] in BUCKETS
    for r in range(len(inputs)):
      if packing:
        segments = batch["inputs_segments"][r]
        pieces = [
          (inputs[r][segments == s], outputs[r][batch["targets_segments"][r] == s])
          for s in range(1, segments.max() + 1)
        ]
        for key in ("inputs", "targets"):  # positions count from 0 within each pair
          for s in range(1, segments.max() + 1):
            where = batch[f"{key}_segments"][r] == s
            assert batch[f"{key}_positions"][r][where].tolist() == list(range(where.sum()))
      else:
        pieces = [(inputs[r][inputs[r] != PAD_ID], outputs[r][outputs[r] != PAD_ID])]
      for source, target in pieces:
        if not source.size:  # a padding row
          continue
        i = int(source[0]) - FIRST_ID
        assert source.tolist() == with_eos(sources[i]) and target.tolist() == with_eos(targets[i])
        seen.append(i)
  assert sorted(seen) == usable(cache)[0].tolist()


def test_packing_leaves_little_padding_and_buckets_more(cache):
  """Empty target slots, in rows that hold a pair (the epoch's last batch also has empty rows,
  a large share of this small epoch)."""

  def padding(packing):
    batches = take(stream(cache, packing), epoch_batches(cache, packing))
    rows = [row for b in batches for row in b["targets"] if row.any()]
    return 1 - sum((row != PAD_ID).sum() for row in rows) / sum(row.size for row in rows)

  assert padding(True) < 0.05 and padding(True) < padding(False) / 4


def ids_of(batches):
  return [[int(row[0]) for row in b["inputs"] if row.any()] for b in batches]


@pytest.mark.parametrize("packing", [False, True])
def test_order_is_a_function_of_seed_and_epoch(cache, packing):
  per_epoch = epoch_batches(cache, packing)
  first = take(stream(cache, packing, seed=3), 2 * per_epoch)
  again = take(stream(cache, packing, seed=3), 2 * per_epoch)
  other_seed = take(stream(cache, packing, seed=4), per_epoch)
  assert ids_of(first) == ids_of(again)
  assert ids_of(first[:per_epoch]) != ids_of(first[per_epoch:])
  assert ids_of(first[:per_epoch]) != ids_of(other_seed)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("k", [0, 5, 17, 23])
def test_restore_continues_like_uninterrupted(cache, packing, k):
  """Prefetching runs ahead of the consumer; the state is that of the last batch taken."""
  expected = take(stream(cache, packing), k + 6)[k:]
  interrupted = stream(cache, packing)
  take(interrupted, k)
  state = json.loads(json.dumps(interrupted.state()))
  interrupted.close()
  resumed = stream(cache, packing)
  resumed.restore(state)
  for got, want in zip(take(resumed, 6), expected, strict=True):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize(
  "state",
  [{}, {"epoch": 0, "chunk": 0}, {"epoch": "1", "chunk": 0, "batch": 0}, {"epoch": 0.5}],
)
def test_a_position_that_is_not_one_is_refused(cache, state):
  """A stream record emptied or edited (its hash rewritten) would restart the stream from the
  start, silently: it is refused instead."""
  resumed = stream(cache)
  try:
    with pytest.raises(UserError, match=r"is not an \(epoch, chunk, batch\) of this stream"):
      resumed.restore(state)
  finally:
    resumed.close()


@pytest.mark.parametrize("packing", [False, True])
def test_process_slices_make_up_the_global_batch(cache, packing):
  single = take(stream(cache, packing), 25)
  parts = [take(stream(cache, packing, share=Share(p, 2)), 25) for p in (0, 1)]
  for whole, part0, part1 in zip(single, *parts):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part0[key], part1[key]]), whole[key])


def test_budget_error_names_the_fix(cache):
  with pytest.raises(ValueError, match=r"tokens_per_batch=100 cannot fit 4 rows of length 48"):
    Layout.of(max_len=MAX_LENGTH, packing=True, tokens_per_batch=100, multiple=4)


def test_default_length_buckets():
  assert batching.default_length_buckets(256) == (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
  assert batching.default_length_buckets(100) == (8, 16, 24, 32, 48, 64, 96, 100)


def test_language_model_windows_every_epoch_once():
  windows = np.arange(40 * 16, dtype=np.int32).reshape(40, 16) + FIRST_ID
  lm = language_model_stream(windows, 8, seed=0)
  rows = np.concatenate([b["targets"] for b in take(lm, 5)])
  assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, windows.tolist()))
  lm.close()
