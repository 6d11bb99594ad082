"""Greedy decoding: the KV cache against recomputation and an eager reference loop; jit reuse."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.decode import greedy_decode
from transformer.decode.greedy import _greedy_decode


def loop_greedy(model, src_BS, max_length):
  """The textbook loop in Python: run the full model on the prefix, append the argmax (never PAD).

  The prefix sits in a fixed [B, max_length] buffer so the forward pass compiles once; causal
  masking makes the logits at t independent of the PAD beyond it.
  """
  forward = nnx.jit(lambda model, src_BS, tgt_in_BT: model(src_BS, tgt_in_BT))
  tgt_in_BT = np.full((src_BS.shape[0], max_length), PAD_ID)
  tgt_in_BT[:, 0] = BOS_ID
  tokens = []
  done_B = np.zeros(src_BS.shape[0], bool)
  for t in range(max_length):
    logits_BV = np.array(forward(model, src_BS, jnp.asarray(tgt_in_BT, jnp.int32))[:, t])
    logits_BV[:, PAD_ID] = -np.inf
    token_B = np.where(done_B, PAD_ID, logits_BV.argmax(-1))
    done_B |= token_B == EOS_ID
    tokens.append(token_B)
    if t + 1 < max_length:
      tgt_in_BT[:, t + 1] = token_B
  return np.stack(tokens, axis=1)


def test_cached_greedy_equals_recomputed_and_python_loop(copy_model, copy_sources):
  cached = greedy_decode(copy_model, copy_sources, max_new_tokens=10)
  recomputed = greedy_decode(copy_model, copy_sources, max_new_tokens=10, use_cache=False)
  np.testing.assert_array_equal(cached, recomputed)
  np.testing.assert_array_equal(cached, loop_greedy(copy_model, copy_sources, 10))


def test_cache_equals_recompute_on_rope_pre_norm_untied_model():
  """Random weights, so each step's argmax is arbitrary: any cache slip changes the tokens."""
  config = TransformerConfig.tiny(position="rope", norm="pre", tie_output=False)
  model = EncoderDecoder(config, rngs=nnx.Rngs(4))  # a seed whose outputs vary (some repeat one)
  src_BS = jnp.asarray(np.random.default_rng(2).integers(4, 64, (3, 6)), jnp.int32)
  src_BS = src_BS.at[0, 3:].set(PAD_ID)
  cached = greedy_decode(model, src_BS, max_new_tokens=9, eos_id=-1)
  assert len(np.unique(cached)) > 3, cached
  np.testing.assert_array_equal(
    cached, greedy_decode(model, src_BS, max_new_tokens=9, use_cache=False, eos_id=-1)
  )


def test_output_is_eos_terminated_then_padded(copy_model, copy_sources):
  tokens_BT = np.asarray(greedy_decode(copy_model, copy_sources, max_new_tokens=10))
  for row in tokens_BT:
    ends = np.flatnonzero(row == EOS_ID)
    assert len(ends) == 1, row
    assert np.all(row[: ends[0]] != PAD_ID) and np.all(row[ends[0] + 1 :] == PAD_ID), row
  # Lightly trained, the model copies some sources exactly and most in part.
  lengths_B = np.sum(np.asarray(copy_sources) != PAD_ID, axis=1)
  copied = [
    np.array_equal(row[: n + 1], np.append(src[:n], EOS_ID))
    for row, src, n in zip(tokens_BT, np.asarray(copy_sources), lengths_B)
  ]
  assert any(copied), tokens_BT
  assert np.mean(tokens_BT[:, 0] == np.asarray(copy_sources)[:, 0]) > 0.5, tokens_BT


def test_jitted_greedy_traces_once_per_shape(copy_model):
  # A (batch, length) no other test uses, so the first call is the only trace.
  sizes_before = _greedy_decode.pure._cache_size()
  rng = np.random.default_rng(5)
  for _ in range(3):
    src_BS = jnp.asarray(rng.integers(5, 16, (5, 3)), jnp.int32)
    greedy_decode(copy_model, src_BS, max_new_tokens=4)
  # Another model of the same architecture reuses the compilation too.
  other = EncoderDecoder(copy_model.config, rngs=nnx.Rngs(7))
  other.eval()
  greedy_decode(other, src_BS, max_new_tokens=4)
  assert _greedy_decode.pure._cache_size() == sizes_before + 1
  # The caller's model is left as it was: no cache was attached to it.
  assert not nnx.state(copy_model, nnx.Cache)
