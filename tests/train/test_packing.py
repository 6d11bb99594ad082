"""A packed batch computes what the same pairs compute unpacked: per-pair losses and gradients.

Packing puts several pairs in one row, with segment ids and per-pair positions; attention, cross-
attention, positions, teacher forcing and the loss must keep the pairs apart exactly.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer.data.stream import assemble_translation
from transformer.data.token_cache import TokenCache
from transformer.train.loss import label_smoothed_cross_entropy
from transformer.train.step import TASK_OUTPUTS

LENGTH = 24
# (source ids, target ids) without EOS; rows of the packed batch: pairs 0-2, pairs 3-4.
PAIRS = [
  ([5, 6, 7], [8, 9]),
  ([10, 11], [12, 13, 14, 15]),
  ([16, 17, 18, 19, 20], [21]),
  ([22, 23, 24, 25], [26, 27, 28]),
  ([29], [30, 31, 32, 33, 34, 35]),
]
PACKED_ROWS = [(0, 1, 2), (3, 4)]


class InMemoryCache(TokenCache):
  """The token cache interface over PAIRS, with no files."""

  def __init__(self):
    super().__init__(
      directory=Path("<memory>"), lengths=np.array([[len(s), len(t)] for s, t in PAIRS]), meta={}
    )

  def read_flat(self, indices):
    return np.array([i for k in indices for side in PAIRS[k] for i in side], np.int32)


def per_pair_losses(params, graphdef, rest, batch, pair_of_token):
  """Summed smoothed loss of each pair's target tokens: [num pairs]."""
  model = nnx.merge(graphdef, params, rest)
  logits_BTV, targets_BT, weights_BT = TASK_OUTPUTS["translation"](model, batch)
  loss_BT = label_smoothed_cross_entropy(logits_BTV, targets_BT, 0.1) * weights_BT
  return jax.ops.segment_sum(loss_BT.ravel(), pair_of_token.ravel(), num_segments=len(PAIRS) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_packed_pairs_have_the_losses_and_gradients_of_unpacked_ones(attention):
  config = TransformerConfig.tiny(
    vocab_size=40, max_len=LENGTH, attention=attention, attention_block_size=8
  )
  graphdef, params, rest = nnx.split(EncoderDecoder(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  cache = InMemoryCache()
  unpacked = assemble_translation(cache, [(i,) for i in range(len(PAIRS))], LENGTH, packed=False)
  packed = assemble_translation(cache, PACKED_ROWS, LENGTH, packed=True)
  # Which pair each target token belongs to (0 for padding): row i of `unpacked` is pair i.
  unpacked_pair = np.where(unpacked["targets"] != 0, np.arange(1, len(PAIRS) + 1)[:, None], 0)
  packed_pair = np.zeros_like(packed["targets"])
  for r, row in enumerate(PACKED_ROWS):
    for segment, pair in enumerate(row, start=1):
      packed_pair[r][packed["targets_segments"][r] == segment] = pair + 1

  def loss_and_grads(batch, pair_of_token):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = per_pair_losses(params, graphdef, rest, batch, jnp.asarray(pair_of_token))
    grads = jax.grad(
      lambda p: per_pair_losses(p, graphdef, rest, batch, jnp.asarray(pair_of_token)).sum()
    )(params)
    return np.asarray(losses[1:]), grads

  want_losses, want_grads = loss_and_grads(unpacked, unpacked_pair)
  got_losses, got_grads = loss_and_grads(packed, packed_pair)
  assert np.all(want_losses > 0)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  # Gradients sum over other numbers of rows in float32: compared by each array's relative error,
  # with a floor of 1e-6 of the whole gradient's norm for the attention key biases, whose exact
  # gradient is zero (a bias shared by every key shifts a row's logits by one constant).
  scale = np.sqrt(
    sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(want_grads))
  )
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-6 * scale


def test_packed_rows_hold_each_pair_with_eos_its_segment_and_positions():
  packed = assemble_translation(InMemoryCache(), PACKED_ROWS, LENGTH, packed=True)
  assert packed["inputs"][0][:11].tolist() == [5, 6, 7, 3, 10, 11, 3, 16, 17, 18, 19]
  assert packed["inputs_segments"][0][:13].tolist() == [1] * 4 + [2] * 3 + [3] * 6
  assert packed["targets_positions"][1][:12].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0]
  assert packed["targets_segments"][1][11:].tolist() == [0] * 13  # padding
