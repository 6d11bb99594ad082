"""Decoding reads the tied output table transposed ([D, V], `Embedding.init_cache`): the same
logits as the table itself, and never a copy older than the table."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer.data.tokenizer import EOS_ID
from transformer.decode import greedy_decode

CONFIG = TransformerConfig.tiny(vocab_size=40, max_len=16)


def test_the_transposed_table_gives_the_tables_logits():
  model = EncoderDecoder(CONFIG, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(1), (3, 5, CONFIG.d_model))
  reference = np.asarray(x_BTD) @ np.asarray(model.target_embed.table[...]).T
  model.target_embed.init_cache()
  np.testing.assert_allclose(model.target_embed.attend(x_BTD), reference, rtol=1e-5, atol=1e-5)


def test_a_table_trained_after_decoding_is_read_as_it_is_now():
  """A model that decoded once (its copy made) and then changed decodes with the new table, as a
  model made with that table does; only an engine's frozen copy is kept."""
  src_BS = jnp.array([[5, 6, 7, EOS_ID], [8, 9, EOS_ID, 0]])
  model = EncoderDecoder(CONFIG, rngs=nnx.Rngs(0))
  model.init_cache(model.encode(src_BS), src_BS, 8)  # the copy of the table as it is now
  new_table = jax.random.normal(jax.random.key(2), model.target_embed.table.shape)
  model.target_embed.table[...] = new_table
  fresh = EncoderDecoder(CONFIG, rngs=nnx.Rngs(0))
  fresh.target_embed.table[...] = new_table
  got = greedy_decode(model, src_BS, max_new_tokens=8)
  np.testing.assert_array_equal(got, greedy_decode(fresh, src_BS, max_new_tokens=8))
  frozen = model.target_embed
  frozen.init_cache(frozen=True)
  kept = frozen.table_DV[...]
  frozen.init_cache()
  assert frozen.table_DV[...] is kept  # an engine's copy is made once
