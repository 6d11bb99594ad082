"""Evaluation batches, EOS and masked-LM corruption, checked against the examples themselves."""

import numpy as np

from transformer.data.pipeline import eval_batches, lm_windows, make_examples, mask_tokens
from transformer.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID

FIRST_ID = 5  # Ordinary ids start after PAD/UNK/BOS/EOS/MASK.


def fake_ids(n, max_len, seed):
  """n sequences of 1..max_len ids; sequence i starts with FIRST_ID + i to identify it."""
  rng = np.random.default_rng(seed)
  return [
    [FIRST_ID + i] + list(rng.integers(FIRST_ID, 100, rng.integers(0, max_len))) for i in range(n)
  ]


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


def example_id(row):
  """The position of a row's pair among the pairs given to make_examples."""
  return int(row[0]) - FIRST_ID


def test_lm_windows():
  ids = fake_ids(50, 12, 5)
  windows = lm_windows(ids, 16)
  stream = [i for seq in ids for i in seq + [EOS_ID]]
  assert windows.shape == (-(-len(stream) // 16), 16)
  assert windows.ravel().tolist() == stream + [PAD_ID] * (windows.size - len(stream))


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
