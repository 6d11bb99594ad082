"""Shared decoding fixtures.

`copy_model`: a tiny encoder-decoder trained briefly on the copy task, so decoding has real
choices to make. After ~100 Adam steps it copies most sentences but is still unsure on some,
which is where greedy and beam search can differ.

`tokenizer` and `write_run` (a trained SentencePiece model and a run directory) come from the
conftest of tests/.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer.data.tokenizer import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
)
from transformer.train.optimizer import with_standard_promotion

COPY_VOCAB = 16
COPY_LENGTH = 8


def copy_batch(rng: np.random.Generator, batch: int, length: int = COPY_LENGTH):
  """(source, decoder input, target): target = source + EOS, decoder input = BOS + source."""
  lengths_B = rng.integers(2, length + 1, batch)
  real_BS = np.arange(length)[None, :] < lengths_B[:, None]
  src_BS = np.where(real_BS, rng.integers(EOS_ID + 2, COPY_VOCAB, (batch, length)), PAD_ID)
  tgt_BT = np.concatenate([src_BS, np.full((batch, 1), PAD_ID)], axis=1)
  tgt_BT[np.arange(batch), lengths_B] = EOS_ID
  tgt_in_BT = np.concatenate([np.full((batch, 1), BOS_ID), tgt_BT[:, :-1]], axis=1)
  return tuple(jnp.asarray(x, jnp.int32) for x in (src_BS, tgt_in_BT, tgt_BT))


def train_copy_model(steps: int = 100, seed: int = 0) -> EncoderDecoder:
  model = EncoderDecoder(TransformerConfig.tiny(vocab_size=COPY_VOCAB), rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, with_standard_promotion(optax.adam(3e-3)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, src_BS, tgt_in_BT, tgt_BT):
    def loss_fn(model):
      losses_BT = optax.softmax_cross_entropy_with_integer_labels(model(src_BS, tgt_in_BT), tgt_BT)
      weights_BT = (tgt_BT != PAD_ID).astype(jnp.float32)
      return jnp.sum(losses_BT * weights_BT) / jnp.sum(weights_BT)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    loss = train_step(model, optimizer, *copy_batch(rng, 32))
  assert float(loss) < 1.0, f"copy task did not train: loss {float(loss)}"
  model.eval()
  return model


@pytest.fixture(scope="session")
def copy_model() -> EncoderDecoder:
  # Seed 1: after 100 steps it ends every held-out source with EOS within 10 tokens (as the
  # tests read its greedy output) while beam search still finds better on some; seeds 0, 4
  # and 5 of these initialisers leave one source running past 10 tokens.
  return train_copy_model(seed=1)


@pytest.fixture(scope="session")
def copy_sources() -> jax.Array:
  """Eight held-out sources [8, 8] of lengths 2..8, padded with PAD."""
  return copy_batch(np.random.default_rng(1), 8)[0]
