"""Every test runs the package under jaxtyping's import hook with beartype (pyproject.toml's
`--jaxtyping-packages`), so each shape and dtype in a signature is checked wherever a test calls
it. These tests make sure the hook is on: a call that contradicts a signature fails."""

import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

from transformer.model.attention import attention_logits
from transformer.model.layers import sinusoidal_position_encoding


def test_a_shape_that_contradicts_its_signature_is_refused():
  q_BTNH = jnp.ones((2, 5, 4, 8))
  k_BSNH = jnp.ones((2, 7, 3, 8))  # N = 3 heads against the queries' 4
  with pytest.raises(TypeCheckError, match="N"):
    attention_logits(q_BTNH, k_BSNH)


def test_a_value_of_the_wrong_type_is_refused():
  with pytest.raises(TypeCheckError):
    sinusoidal_position_encoding("8", 16)  # type: ignore[arg-type]


def test_a_call_that_agrees_with_its_signature_passes():
  logits_BNTS = attention_logits(jnp.ones((2, 5, 4, 8)), jnp.ones((2, 7, 4, 8)))
  assert logits_BNTS.shape == (2, 4, 5, 7)
