"""Parameter initialisers that compile one program per distribution, whatever the shape.

`nnx.initializers` draw through `jax.random`, which compiles a program per shape and dtype: the
threefry bits of one shape cost 0.2-0.4 s of XLA compilation on a CPU core, and a model of seven
parameter shapes spent ~2 s of its first run compiling samplers (plus ~25 ms for each shape's
zeros, ones and scaling). Here every draw is a run of fixed-size chunks: chunk i holds `CHUNK`
unit samples from `fold_in(key, i)`, the chunks are cut to the parameter's size and scaled on the
host. The distributions and scales are those of the `nnx.initializers` of the same names
(`variance_scaling`'s fans included); the values differ from theirs.

Under a trace (`nnx.eval_shape`, `jax.jit`) the same chunks are traced, so a traced initialisation
gives the values of an eager one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

CHUNK = 1 << 16  # 256 KiB of float32: the smallest parameter drawn still costs ~0.7 ms

# Mass of a standard normal within +-2: the truncated normal's standard deviation is this much
# smaller than the untruncated one's (the same constant as jax.nn.initializers).
_TRUNCATED_STDDEV = 0.87962566103423978


@functools.partial(jax.jit, static_argnums=1)
def _chunk(key: jax.Array, kind: str) -> jax.Array:
  if kind == "normal":
    return jax.random.normal(key, (CHUNK,), jnp.float32)
  if kind == "uniform":
    return jax.random.uniform(key, (CHUNK,), jnp.float32, -1.0, 1.0)
  return jax.random.truncated_normal(key, -2.0, 2.0, (CHUNK,), jnp.float32)


def unit_samples(key: jax.Array, kind: str, shape: Sequence[int]) -> np.ndarray | jax.Array:
  """float32 samples of a standard `kind` ("normal", "uniform" on [-1, 1), "truncated_normal"
  on [-2, 2]) in `shape`: a NumPy array for a concrete key, a traced one under a trace."""
  size = math.prod(shape)
  count = -(-size // CHUNK)
  if isinstance(key, jax.core.Tracer):
    # The same chunks as one vmapped draw: a trace of constant size, whatever the parameter's
    # (`nnx.eval_shape` of a model with 10^10 parameters draws nothing).
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count, dtype=jnp.uint32))
    traced = jax.vmap(lambda k: _chunk(k, kind))(keys).reshape(-1)
    return traced[:size].reshape(shape)
  chunks = [np.asarray(_chunk(jax.random.fold_in(key, i), kind)) for i in range(count)]
  flat = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
  return flat[:size].reshape(shape)


def _scaled(key: jax.Array, kind: str, shape: Sequence[int], scale: float, dtype) -> jax.Array:
  samples = unit_samples(key, kind, shape)
  if isinstance(samples, jax.Array):
    return (samples * np.float32(scale)).astype(dtype)
  # Scaled in NumPy: a jnp multiply would compile a program for each shape.
  return jnp.asarray((samples * np.float32(scale)).astype(jnp.dtype(dtype)))


def normal(stddev: float = 1e-2) -> Initializer:
  """N(0, stddev^2), as `nnx.initializers.normal`."""

  def init(key, shape, dtype=jnp.float32):
    return _scaled(key, "normal", shape, stddev, dtype)

  return init


def fans(
  shape: Sequence[int], in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1
) -> tuple[int, int]:
  """(fan_in, fan_out) of `shape` as `jax.nn.initializers.variance_scaling` counts them: the
  product of the input (output) axes, times every other axis (a convolution's receptive field)."""
  shape = tuple(shape)
  if len(shape) < 2:
    raise ValueError(f"fans need a shape of 2 or more axes, got {shape}")
  ins = (in_axis,) if isinstance(in_axis, int) else tuple(in_axis)
  outs = (out_axis,) if isinstance(out_axis, int) else tuple(out_axis)
  ins, outs = (tuple(a % len(shape) for a in axes) for axes in (ins, outs))
  in_size = math.prod(shape[a] for a in ins)
  out_size = math.prod(shape[a] for a in outs)
  receptive = math.prod(n for a, n in enumerate(shape) if a not in ins + outs)
  return in_size * receptive, out_size * receptive


def variance_scaling(
  scale: float,
  mode: str,
  distribution: str,
  in_axis: int | Sequence[int] = -2,
  out_axis: int | Sequence[int] = -1,
) -> Initializer:
  """Variance scale / fan (fan_in, fan_out or their mean), as `nnx.initializers.variance_scaling`:
  "uniform" on +-sqrt(3 variance), "normal", or "truncated_normal" at +-2 standard deviations."""
  if mode not in ("fan_in", "fan_out", "fan_avg"):
    raise ValueError(f"mode {mode!r}: use fan_in, fan_out or fan_avg")
  if distribution not in ("uniform", "normal", "truncated_normal"):
    raise ValueError(f"distribution {distribution!r}: use uniform, normal or truncated_normal")

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = fans(shape, in_axis, out_axis)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = scale / fan
    if distribution == "uniform":
      return _scaled(key, "uniform", shape, math.sqrt(3 * variance), dtype)
    if distribution == "normal":
      return _scaled(key, "normal", shape, math.sqrt(variance), dtype)
    return _scaled(key, "truncated_normal", shape, math.sqrt(variance) / _TRUNCATED_STDDEV, dtype)

  return init


def xavier_uniform(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1):
  """Glorot uniform, as `nnx.initializers.xavier_uniform`."""
  return variance_scaling(1.0, "fan_avg", "uniform", in_axis, out_axis)


def lecun_normal(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1):
  """LeCun's truncated normal, as `nnx.initializers.lecun_normal`."""
  return variance_scaling(1.0, "fan_in", "truncated_normal", in_axis, out_axis)


def constant(value: float) -> Initializer:
  """Every entry `value`, made in NumPy (no compiled program per shape)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(np.full(tuple(shape), value, jnp.dtype(dtype)))

  return init


zeros = constant(0.0)
ones = constant(1.0)
