"""The initialisers against jax.nn.initializers' own formulas: same scales, one compiled sampler
per distribution, the same values traced as eager."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.model import init

SHAPES = [
  ((128, 512), -2, -1),
  ((128, 4, 32), 0, (1, 2)),  # attention's [D, N, H] in-projection
  ((4, 32, 128), (0, 1), 2),  # and its [N, H, D] out-projection
  ((3, 5, 16, 32), -2, -1),  # a receptive field: fans times 15
]


def ratio(values, unit) -> np.ndarray:
  """values / unit samples, where the unit samples are not ~0."""
  values, unit = np.asarray(values, np.float64), np.asarray(unit, np.float64)
  keep = np.abs(unit) > 1e-3
  return values[keep] / unit[keep]


@pytest.mark.parametrize("shape, in_axis, out_axis", SHAPES)
@pytest.mark.parametrize(
  "name, kind, jax_unit",
  [
    ("xavier_uniform", "uniform", lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0)),
    ("lecun_normal", "truncated_normal", lambda k, s: jax.random.truncated_normal(k, -2, 2, s)),
  ],
)
def test_scales_are_those_of_jax_initializers(shape, in_axis, out_axis, name, kind, jax_unit):
  """jax's initializer is its unit sampler times a scale (its fans): that scale, read off its
  own values, is ours."""
  key = jax.random.key(0)
  theirs = getattr(nnx.initializers, name)(in_axis=in_axis, out_axis=out_axis)(key, shape)
  their_scale = ratio(theirs, jax_unit(key, shape))
  ours = getattr(init, name)(in_axis=in_axis, out_axis=out_axis)(key, shape)
  our_scale = ratio(ours, init.unit_samples(key, kind, shape))
  assert ours.shape == tuple(shape) and ours.dtype == jnp.float32
  np.testing.assert_allclose(their_scale, their_scale[0], rtol=1e-5)  # one scale
  np.testing.assert_allclose(our_scale, their_scale[0], rtol=1e-5)


def test_normal_and_the_unit_distributions():
  key = jax.random.key(1)
  values = np.asarray(init.normal(0.3)(key, (512, 256)), np.float64)
  assert abs(values.mean()) < 0.003 and abs(values.std() - 0.3) < 0.003
  uniform = np.asarray(init.unit_samples(key, "uniform", (200_000,)))
  assert -1 <= uniform.min() < -0.999 and 0.999 < uniform.max() < 1
  assert abs(uniform.std() - 1 / np.sqrt(3)) < 0.003
  truncated = np.asarray(init.unit_samples(key, "truncated_normal", (200_000,)))
  assert truncated.min() >= -2 and truncated.max() <= 2
  assert abs(truncated.std() - 0.87962566103423978) < 0.005


def test_one_compiled_sampler_per_distribution_whatever_the_shape():
  init.normal(1.0)(jax.random.key(0), (3, 7))
  compiled = init._chunk._cache_size()
  for shape in [(5,), (129, 513), (2, 3, 4, 5), (init.CHUNK + 3,)]:
    init.normal(1.0)(jax.random.key(2), shape)
  assert init._chunk._cache_size() == compiled


def test_values_are_fixed_by_the_key_and_chunks_do_not_repeat():
  key = jax.random.key(4)
  a = np.asarray(init.normal(1.0)(key, (2, init.CHUNK + 10)))
  np.testing.assert_array_equal(a, np.asarray(init.normal(1.0)(key, (2, init.CHUNK + 10))))
  assert not np.allclose(a, np.asarray(init.normal(1.0)(jax.random.key(5), a.shape)))
  flat = a.ravel()
  assert not np.allclose(flat[: init.CHUNK], flat[init.CHUNK : 2 * init.CHUNK])


def test_traced_initialisation_gives_the_eager_values():
  key = jax.random.key(6)
  glorot = init.xavier_uniform(in_axis=0, out_axis=(1, 2))
  eager = glorot(key, (64, 2, 16))
  traced = jax.jit(lambda k: glorot(k, (64, 2, 16)))(key)
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(eager))
  big = (100_000, 100_000)  # 10^10 parameters: abstract, nothing drawn or traced per chunk
  assert jax.eval_shape(lambda k: init.normal(1.0)(k, big), key).shape == big
  for shape in [(init.CHUNK * 2 + 7,), (0, 5)]:  # several chunks, none
    traced = jax.jit(lambda k, shape=shape: init.normal(1.0)(k, shape))(key)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(init.normal(1.0)(key, shape)))


def test_constants_and_dtypes():
  key = jax.random.key(0)
  np.testing.assert_array_equal(np.asarray(init.zeros(key, (3, 2))), np.zeros((3, 2)))
  np.testing.assert_array_equal(np.asarray(init.ones(key, (4,), jnp.bfloat16)), np.ones(4))
  assert init.ones(key, (4,), jnp.bfloat16).dtype == jnp.bfloat16
  assert init.xavier_uniform()(key, (8, 8), jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="2 or more axes"):
    init.xavier_uniform()(key, (8,))
