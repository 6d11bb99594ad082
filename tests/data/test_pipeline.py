"""Batching of token ids, checked against the examples themselves (pure NumPy, no model)."""

import json

import numpy as np
import pytest

from transformer.data.pipeline import (
  default_length_buckets,
  eval_batches,
  lm_train_batches,
  lm_windows,
  make_examples,
  mask_tokens,
  translation_train_batches,
)
from transformer.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID

MAX_LENGTH = 48
BUCKETS = (8, 16, 24, 32, 48)
TOKENS = 512
FIRST_ID = 5  # Ordinary ids start after PAD/UNK/BOS/EOS/MASK.


def fake_ids(n, max_len, seed):
  """n sequences of 1..max_len ids; sequence i starts with FIRST_ID + i to identify it."""
  rng = np.random.default_rng(seed)
  return [
    [FIRST_ID + i] + list(rng.integers(FIRST_ID, 100, rng.integers(0, max_len))) for i in range(n)
  ]


@pytest.fixture(scope="module")
def examples():
  examples, _ = make_examples(fake_ids(300, 56, 1), fake_ids(300, 56, 2), MAX_LENGTH)
  return examples


def train_iterator(examples, seed=0, **kwargs):
  kwargs = {"tokens_per_batch": TOKENS, "length_buckets": BUCKETS, "batch_multiple": 4, **kwargs}
  return translation_train_batches(examples, seed=seed, **kwargs)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def example_id(row):
  """The position of a row's pair among the pairs given to make_examples."""
  return int(row[0]) - FIRST_ID


def expected_batches(examples, buckets, tokens, multiple):
  """sum over buckets of ceil(examples in bucket / rows per batch), counted directly."""
  lengths = [max(len(s), len(t)) for s, t in zip(examples.inputs, examples.targets)]
  total, lower = 0, 0
  for upper in buckets:
    count = sum(lower < n <= upper for n in lengths)
    rows = tokens // upper // multiple * multiple
    total, lower = total + -(-count // rows), upper
  return total


def test_make_examples_drop_and_truncate():
  src, tgt = [[5] * 3, [6] * 9, [7] * 2], [[8] * 2, [9] * 1, [10] * 10]
  kept, stats = make_examples(src, tgt, 8)
  assert (stats.kept, stats.dropped, stats.truncated) == (1, 2, 0)
  assert kept.index.tolist() == [0]
  assert kept.inputs[0].tolist() == [5, 5, 5, EOS_ID] and kept.targets[0].tolist() == [8, 8, EOS_ID]
  cut, stats = make_examples(src, tgt, 8, truncate=True)
  assert (stats.kept, stats.dropped, stats.truncated) == (3, 0, 2)
  assert cut.inputs[1].tolist() == [6] * 7 + [EOS_ID]
  assert max(len(s) for s in cut.inputs + cut.targets) == 8


def test_default_length_buckets():
  assert default_length_buckets(256) == (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
  assert default_length_buckets(100) == (8, 16, 24, 32, 48, 64, 96, 100)


def test_epoch_covers_every_example_once_within_budget(examples):
  iterator = train_iterator(examples)
  assert iterator.batches_per_epoch == expected_batches(examples, BUCKETS, TOKENS, 4)
  position = {int(original): i for i, original in enumerate(examples.index)}
  seen = []
  for batch in take(iterator, iterator.batches_per_epoch):
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.dtype == targets.dtype == np.int32
    assert inputs.shape == targets.shape and inputs.shape[1] in BUCKETS
    assert inputs.size <= TOKENS and inputs.shape[0] % 4 == 0
    for row_in, row_tgt in zip(inputs, targets):
      if not row_in.any():  # A padding row fills the bucket's last batch.
        assert not row_tgt.any()
        continue
      i = position[example_id(row_in)]
      src, tgt = examples.inputs[i], examples.targets[i]
      np.testing.assert_array_equal(row_in[: len(src)], src)
      np.testing.assert_array_equal(row_tgt[: len(tgt)], tgt)
      assert not row_in[len(src) :].any() and not row_tgt[len(tgt) :].any()  # PAD is 0.
      seen.append(i)
  assert sorted(seen) == list(range(len(examples)))
  assert iterator.state() == {"epoch": 1, "batch_index": 0}


def batch_ids(batches):
  return [[example_id(row) for row in b["inputs"] if row.any()] for b in batches]


def test_order_is_a_function_of_seed_and_epoch(examples):
  per_epoch = train_iterator(examples).batches_per_epoch
  first = take(train_iterator(examples, seed=3), 2 * per_epoch)
  again = take(train_iterator(examples, seed=3), 2 * per_epoch)
  other_seed = take(train_iterator(examples, seed=4), per_epoch)
  assert batch_ids(first) == batch_ids(again)
  assert batch_ids(first[:per_epoch]) != batch_ids(first[per_epoch:])
  assert batch_ids(first[:per_epoch]) != batch_ids(other_seed)


@pytest.mark.parametrize("k", [0, 5, 17, 21])  # 17 + 6 crosses the end of the 21-batch epoch.
def test_restore_continues_like_uninterrupted(examples, k):
  uninterrupted = train_iterator(examples)
  assert uninterrupted.batches_per_epoch == 21
  expected = take(uninterrupted, k + 6)[k:]
  interrupted = train_iterator(examples)
  take(interrupted, k)
  state = json.loads(json.dumps(interrupted.state()))
  resumed = train_iterator(examples)
  resumed.restore(state)
  for got, want in zip(take(resumed, 6), expected):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(got[key], want[key])


def test_process_slices_make_up_the_global_batch(examples):
  single = take(train_iterator(examples), 25)
  parts = [take(train_iterator(examples, process_index=p, process_count=2), 25) for p in (0, 1)]
  for whole, part0, part1 in zip(single, *parts):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(np.concatenate([part0[key], part1[key]]), whole[key])


def test_budget_errors(examples):
  with pytest.raises(ValueError, match="tokens_per_batch"):
    train_iterator(examples, tokens_per_batch=100)
  with pytest.raises(ValueError, match="largest bucket"):
    train_iterator(examples, length_buckets=(8, 16))


def test_eval_batches_keep_order_and_mark_padding():
  src, tgt = fake_ids(23, 20, 3), fake_ids(23, 20, 4)
  src[7], tgt[7] = list(range(5, 40)), [5]  # Longer than max_length: truncated, not dropped.
  examples, stats = make_examples(src, tgt, 32, truncate=True)
  assert stats.truncated == 1
  batches = eval_batches(examples, 8, length_buckets=(8, 16, 32))
  assert [b["inputs"].shape[0] for b in batches] == [8, 8, 8]
  assert [b["inputs"].shape[1] for b in batches] == [32, 32, 16]
  weights = np.concatenate([b["weights"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(weights, [1.0] * 23 + [0.0])
  np.testing.assert_array_equal(index, list(range(23)) + [-1])
  last = batches[-1]
  assert not last["inputs"][-1].any() and not last["targets"][-1].any()
  assert [example_id(row) for row in last["inputs"][:7]] == list(range(16, 23))
  halves = [
    eval_batches(examples, 8, length_buckets=(8, 16, 32), process_index=p, process_count=2)
    for p in (0, 1)
  ]
  for whole, part0, part1 in zip(batches, *halves):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part0[key], part1[key]]), whole[key])


def test_lm_windows_and_batches():
  ids = fake_ids(50, 12, 5)
  windows = lm_windows(ids, 16)
  stream = [i for seq in ids for i in seq + [EOS_ID]]
  assert windows.shape == (-(-len(stream) // 16), 16)
  assert windows.ravel().tolist() == stream + [PAD_ID] * (windows.size - len(stream))
  iterator = lm_train_batches(ids, seq_len=16, batch_size=8, seed=0)
  rows = np.concatenate([b["targets"] for b in take(iterator, iterator.batches_per_epoch)])
  rows = rows[rows.any(axis=1)]
  assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, windows.tolist()))


def test_mask_tokens_statistics():
  rng = np.random.default_rng(0)
  ids = rng.integers(FIRST_ID, 1000, size=(64, 128)).astype(np.int32)
  ids[:, 100:] = PAD_ID
  ids[:, 50] = EOS_ID
  ids[:, 0] = BOS_ID
  batch = mask_tokens(ids, np.random.default_rng(1), vocab_size=1000)
  selected = batch["weights"] > 0
  ordinary = ids > MASK_ID
  np.testing.assert_array_equal(batch["targets"], ids)
  assert not selected[~ordinary].any()  # Never padding, BOS or EOS.
  assert abs(selected.sum() / ordinary.sum() - 0.15) < 0.01
  masked = batch["inputs"][selected] == MASK_ID
  kept = batch["inputs"][selected] == ids[selected]
  assert abs(masked.mean() - 0.8) < 0.03 and abs(kept.mean() - 0.1) < 0.03
  assert batch["inputs"][selected].min() >= MASK_ID and batch["inputs"].max() < 1000
  np.testing.assert_array_equal(batch["inputs"][~selected], ids[~selected])
  again = mask_tokens(ids, np.random.default_rng(1), vocab_size=1000)
  np.testing.assert_array_equal(again["inputs"], batch["inputs"])


def test_mask_tokens_over_processes_is_the_single_process_batch():
  ids = np.random.default_rng(0).integers(FIRST_ID, 1000, size=(8, 32)).astype(np.int32)
  whole = mask_tokens(ids, np.random.default_rng(3), vocab_size=1000)
  # Each process holds its contiguous half of the rows and seeds its rng like every other.
  halves = [
    mask_tokens(
      ids[4 * p : 4 * (p + 1)],
      np.random.default_rng(3),
      vocab_size=1000,
      process_index=p,
      process_count=2,
    )
    for p in range(2)
  ]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
