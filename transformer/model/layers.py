"""Embeddings, positional encodings, the feed-forward network and LayerNorm (Sections 3.3-3.5)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from transformer.errors import UserError
from transformer.model import init
from transformer.model.config import TransformerConfig
from transformer.parallel.axes import ACT_EMBED, BATCH, EMBED, LENGTH, MLP, VOCAB, constrain


def param(
  rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype=jnp.float32
) -> nnx.Param:
  """A parameter carrying its logical axis names, mapped to mesh axes later by `parallel.rules`."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


@functools.lru_cache(maxsize=16)
def _sinusoid_table(length: int, d_model: int) -> np.ndarray:
  position_T1 = np.arange(length, dtype=np.float64)[:, None]
  two_i = np.arange(0, d_model, 2, dtype=np.float64)
  angle_TD2 = position_T1 / np.power(10_000.0, two_i / d_model)
  table_TD = np.zeros((length, d_model), np.float64)
  table_TD[:, 0::2] = np.sin(angle_TD2)
  table_TD[:, 1::2] = np.cos(angle_TD2[:, : d_model // 2])
  return table_TD.astype(np.float32)


def position_table_bytes(config: TransformerConfig) -> int:
  """Host memory that building the sinusoidal table takes whenever the model is traced: float64
  angles, sines, cosines and table, then its float32 copy (24 bytes an entry); 0 for learned
  positions (parameters, counted as such) and RoPE (no table)."""
  return 24 * config.max_len * config.d_model if config.position == "sinusoidal" else 0


def sinusoidal_position_encoding(length: int, d_model: int) -> Float[Array, "T D"]:
  """The paper's fixed encodings (Section 3.5), float32 [length, d_model].

  PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).
  Computed in NumPy float64 so it is a compile-time constant, exact to float32 rounding.
  """
  return jnp.asarray(_sinusoid_table(length, d_model))


def rotary_embedding(
  x_BTNH: Float[Array, "B T N H"], positions_BT: Int[Array, "B T"]
) -> Float[Array, "B T N H"]:
  """RoPE (Su et al., 2021): rotates each pair (x_i, x_{i+H/2}) by angle pos / 10000^(2i/H).

  Relative offsets then appear in q.k as a rotation by (pos_q - pos_k), so no table is added.
  """
  half = x_BTNH.shape[-1] // 2
  inv_freq_H2 = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_BTH2 = positions_BT[..., None].astype(jnp.float32) * inv_freq_H2[None, None, :]
  sin_BT1H2 = jnp.sin(angle_BTH2)[:, :, None, :]
  cos_BT1H2 = jnp.cos(angle_BTH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1H2 - x2 * sin_BT1H2, x2 * cos_BT1H2 + x1 * sin_BT1H2], -1)
  return rotated.astype(x_BTNH.dtype)


class DecodingCopy(nnx.Variable):
  """A parameter in another layout, made from the parameters when decoding starts (on the copy of
  the model that decodes): read by decoding only, never trained or saved."""


class Embedding(nnx.Module):
  """Token embedding scaled by sqrt(d_model) (Section 3.4); `attend` is the tied output layer."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    # Variance 1/D so that the sqrt(D)-scaled embedding has unit variance, and the tied
    # output layer starts with logits of unit scale.
    self.table = param(
      rngs,
      init.normal(stddev=config.d_model**-0.5),
      (config.vocab_size, config.d_model),
      (VOCAB, EMBED),
      jnp.dtype(config.param_dtype),
    )
    self.table_DV: Any = nnx.data(None)  # the table transposed, while decoding (`init_cache`)
    self.frozen = False  # its parameters no longer change: the copy is made once (`init_cache`)

  def init_cache(self, *, frozen: bool = False) -> None:
    """Keeps a transposed copy of the table [D, V] for `attend` while decoding. A decoding step
    computes the logits of a few rows: XLA:CPU's matmul reads a [V, D] operand transposed by
    repacking all of it at every step, which costs as much as the product itself (4 rows, V
    8000, D 128, one core: 300 against 150 us a step). It is made again at each call (the
    table may have been trained since), unless a call with `frozen=True` made it for a model
    whose parameters no longer change (a `transformer.decode.engine.Engine`'s copy)."""
    if not self.frozen or self.table_DV is None:
      self.table_DV = DecodingCopy(self.table[...].T)
    self.frozen = self.frozen or frozen

  def __call__(self, ids_BT: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    table_VD = self.table[...].astype(jnp.dtype(self.config.dtype))
    x_BTD = jnp.take(table_VD, ids_BT, axis=0) * math.sqrt(self.config.d_model)
    return constrain(x_BTD, (BATCH, LENGTH, ACT_EMBED))

  def attend(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Pre-softmax linear layer sharing the embedding matrix; logits in the config's
    `resolved_logits_dtype`."""
    dtype = jnp.dtype(self.config.dtype)
    if self.table_DV is not None:
      table_DV = self.table_DV[...].astype(dtype)
      logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, table_DV, preferred_element_type=jnp.float32)
      logits_BTV = logits_BTV.astype(self.config.resolved_logits_dtype)
    else:
      logits_BTV = tied_logits(
        x_BTD, self.table[...].astype(dtype), self.config.resolved_logits_dtype
      )
    return constrain(logits_BTV, (BATCH, LENGTH, VOCAB))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tied_logits(
  x_BTD: Float[Array, "B T D"], table_VD: Float[Array, "V D"], dtype: str = "float32"
) -> Float[Array, "B T V"]:
  """x E^T (accumulated in float32, returned in `dtype`), with a backward pass that reads
  d logits [B T, V] in its own layout.

  Autodiff's gradient of the table, d E = d logits^T x, makes XLA:CPU write a transposed copy of
  the [B T, V] logit gradient (the largest array of the step) before the matmul. Computing
  d E^T = x^T d logits instead transposes only x [B T, D] and the [D, V] result.
  """
  return jnp.einsum("BTD,VD->BTV", x_BTD, table_VD, preferred_element_type=jnp.float32).astype(
    dtype
  )


def _tied_logits_fwd(x_BTD, table_VD, dtype):
  return tied_logits(x_BTD, table_VD, dtype), (x_BTD, table_VD)


def _tied_logits_bwd(dtype, residuals, d_logits_BTV):
  x_BTD, table_VD = residuals
  d_logits_BTV = d_logits_BTV.astype(x_BTD.dtype)
  d_x_BTD = jnp.einsum("BTV,VD->BTD", d_logits_BTV, table_VD)
  d_table_DV = jnp.einsum("BTD,BTV->DV", x_BTD, d_logits_BTV, preferred_element_type=jnp.float32)
  return d_x_BTD, d_table_DV.T.astype(table_VD.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


@jax.custom_vjp
def dense_BTK_KN(x_BTK: Float[Array, "B T K"], w_KN: Float[Array, "K N"]) -> Float[Array, "B T N"]:
  """x W over the last axis, with a backward pass whose weight gradient XLA:CPU runs fast.

  Autodiff's dW = einsum("BTK,BTN->KN") compiles on the CPU to a dot over two contracting axes,
  which XLA:CPU leaves to Eigen's slow path (a model of D 128, F 512 and 768 tokens spent about
  twice the time in its feed-forward layers). dW = x^T dy on the [B T, K] and [B T, N] views is
  one contracting axis, which Eigen runs at its usual rate. (Not YNNPACK, XLA:CPU's fastest
  matmul: it takes a left operand only with its contracting axis last, and a transposed copy of
  x costs more than it saves: the [768, 512] GELU output's copy took 3.4 ms with the GELU fused
  in, jaxlib 0.10.2.)
  """
  return jnp.einsum("BTK,KN->BTN", x_BTK, w_KN)


def _dense_fwd(x_BTK, w_KN):
  return dense_BTK_KN(x_BTK, w_KN), (x_BTK, w_KN)


def _dense_bwd(residuals, d_y_BTN):
  x_BTK, w_KN = residuals
  d_x_BTK = jnp.einsum("BTN,KN->BTK", d_y_BTN, w_KN)
  x_MK = x_BTK.reshape(-1, x_BTK.shape[-1])  # M = B T
  d_y_MN = d_y_BTN.reshape(-1, d_y_BTN.shape[-1])
  return d_x_BTK, _weight_gradient(x_MK, d_y_MN).astype(w_KN.dtype)


def _weight_gradient(x_MK: Float[Array, "M K"], d_y_MN: Float[Array, "M N"]) -> Float[Array, "K N"]:
  """x^T dy, in float32. Eigen runs such a product about twice as fast when its result has the
  fewer rows (768 tokens: [512, 128] in 1.90 ms, [128, 512] in 0.98 ms; 3,072 tokens, [2048, 512]
  in 78 ms against 66 for its transpose; jaxlib 0.10.2, one core of an AMD EPYC, and the same way
  round on an Intel Xeon), so on the CPU a tall result is computed as (dy^T x)^T: the transpose
  is a copy of K N values, kept out of the product by a barrier (XLA would otherwise fold it back
  into the product's operands). The shakespeare_char step: 3.2-3.4 ms less of ~53 (paired in one
  process)."""
  if x_MK.shape[-1] > d_y_MN.shape[-1] and jax.default_backend() == "cpu":
    d_w_NK = jnp.matmul(d_y_MN.T, x_MK, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(d_w_NK).T
  return jnp.matmul(x_MK.T, d_y_MN, preferred_element_type=jnp.float32)


dense_BTK_KN.defvjp(_dense_fwd, _dense_bwd)


class OutputProjection(nnx.Module):
  """An untied pre-softmax linear layer D -> V, for `tie_output=False`."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.kernel = param(
      rngs,
      init.lecun_normal(),
      (config.d_model, config.vocab_size),
      (EMBED, VOCAB),
      jnp.dtype(config.param_dtype),
    )

  def __call__(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    kernel_DV = self.kernel[...].astype(jnp.dtype(self.config.dtype))
    logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, kernel_DV, preferred_element_type=jnp.float32)
    return constrain(logits_BTV.astype(self.config.resolved_logits_dtype), (BATCH, LENGTH, VOCAB))


class PositionEncoding(nnx.Module):
  """Adds sinusoidal or learned absolute positions; a no-op for RoPE (applied inside attention)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.kind, self.max_len, self.d_model = config.position, config.max_len, config.d_model
    if config.position == "learned":
      # Unit variance, the scale of the sqrt(D)-scaled token embedding each row is added to (as
      # GPT-2 starts both tables at one scale). At 0.02 the positions began 50 times weaker than
      # the tokens: the shakespeare_char recipe reached a validation NLL of 1.888 / 1.905 (seeds
      # 0 / 1) against 1.834 / 1.850 with unit variance.
      self.table = param(
        rngs,
        init.normal(stddev=1.0),
        (config.max_len, config.d_model),
        (LENGTH, EMBED),
        jnp.dtype(config.param_dtype),
      )

  def __call__(self, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"]):
    if self.kind == "rope":
      return x_BTD
    # `jnp.take` fills rows past the table with NaN, which masked attention then spreads to
    # every position; the length is static, so the check costs nothing at run time. (In decode
    # mode the offset is traced, but `init_cache` already bounds the cache by max_len.)
    if positions_BT.shape[-1] > self.max_len:
      raise UserError(
        f"sequence of {positions_BT.shape[-1]} positions exceeds model.max_len="
        f"{self.max_len}: raise max_len or shorten the input"
      )
    if self.kind == "learned":
      table_LD = self.table[...]
    else:  # a constant folded into the compiled program, not a parameter to train or save
      table_LD = sinusoidal_position_encoding(self.max_len, self.d_model)
    return x_BTD + jnp.take(table_LD, positions_BT, axis=0).astype(x_BTD.dtype)


class FeedForward(nnx.Module):
  """FFN(x) = act(x W1 + b1) W2 + b2 (Section 3.3), hidden width F sharded on the `mlp` axis."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, f, w = config.d_model, config.d_ff, jnp.dtype(config.param_dtype)
    glorot = init.xavier_uniform()
    self.wi = param(rngs, glorot, (d, f), (EMBED, MLP), w)
    self.bi = param(rngs, init.zeros, (f,), (MLP,), w) if config.use_bias else None
    self.wo = param(rngs, glorot, (f, d), (MLP, EMBED), w)
    self.bo = param(rngs, init.zeros, (d,), (EMBED,), w) if config.use_bias else None
    self.activation = jax.nn.relu if config.activation == "relu" else jax.nn.gelu

  def __call__(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    dtype = jnp.dtype(self.config.dtype)
    h_BTF = _plus_bias(dense_BTK_KN(x_BTD, self.wi[...].astype(dtype)), self.bi)
    h_BTF = constrain(self.activation(h_BTF), (BATCH, LENGTH, MLP))
    y_BTD = _plus_bias(dense_BTK_KN(h_BTF, self.wo[...].astype(dtype)), self.bo)
    return constrain(y_BTD, (BATCH, LENGTH, ACT_EMBED))


def _plus_bias(y_BTN: Float[Array, "B T N"], bias: nnx.Param | None) -> Float[Array, "B T N"]:
  """y + b over the last axis, in y's dtype; y itself for a layer without biases."""
  return y_BTN if bias is None else y_BTN + bias[...].astype(y_BTN.dtype)[None, None]


# Named, like attention and the loss, so that a profile can tell its fused kernels apart
# (benchmarks/kernel_profile.py).
@functools.partial(jax.named_call, name="layer_norm")
def layer_norm_BTD(
  x_BTD: Float[Array, "B T D"],
  scale_D: Float[Array, " D"],
  bias_D: Float[Array, " D"] | None,
  epsilon: float,
) -> Float[Array, "B T D"]:
  """(x - mean) / sqrt(var + eps) * scale + bias over D (Ba et al., 2016), in x's dtype; no
  bias where `bias_D` is None.

  Mean and variance are taken in float32 whatever x's dtype (bfloat16 sums of 512 squares lose
  the variance's low bits), and the variance as the mean of squared deviations, not
  E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std. The gradient is the
  closed form (`_layer_norm_bwd`): autodiff's took 1.9 ms more of a ~45 ms step of the
  shakespeare_char model on one core (paired in one process).
  """
  return _layer_norm(x_BTD, scale_D, bias_D, float(epsilon))


def _normalized(x_BTD, epsilon: float):
  """((x - mean) / sqrt(var + eps), mean, 1 / sqrt(var + eps)) in float32."""
  x32_BTD = x_BTD.astype(jnp.float32)
  mean_BT1 = jnp.mean(x32_BTD, axis=-1, keepdims=True)
  centred_BTD = x32_BTD - mean_BT1
  variance_BT1 = jnp.mean(jnp.square(centred_BTD), axis=-1, keepdims=True)
  rstd_BT1 = jax.lax.rsqrt(variance_BT1 + jnp.float32(epsilon))
  return centred_BTD * rstd_BT1, mean_BT1, rstd_BT1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x_BTD, scale_D, bias_D, epsilon: float):
  return _layer_norm_fwd(x_BTD, scale_D, bias_D, epsilon)[0]


def _layer_norm_fwd(x_BTD, scale_D, bias_D, epsilon: float):
  normed_BTD, mean_BT1, rstd_BT1 = _normalized(x_BTD, epsilon)
  y_BTD = normed_BTD * _along_last(scale_D, x_BTD.ndim)
  if bias_D is not None:
    y_BTD = y_BTD + _along_last(bias_D, x_BTD.ndim)
  # x in its own dtype and two numbers a row: the normalised rows are made again backward.
  return y_BTD.astype(x_BTD.dtype), (x_BTD, mean_BT1, rstd_BT1, scale_D, bias_D)


def _layer_norm_bwd(epsilon: float, residuals, d_y_BTD):
  """With n = (x - mean) r and g = dy * scale: dx = r (g - mean(g) - n mean(g n)) over D;
  dscale = sum(dy n) and dbias = sum(dy) over every other axis."""
  x_BTD, mean_BT1, rstd_BT1, scale_D, bias_D = residuals
  normed_BTD = (x_BTD.astype(jnp.float32) - mean_BT1) * rstd_BT1
  d_y32_BTD = d_y_BTD.astype(jnp.float32)
  g_BTD = d_y32_BTD * _along_last(scale_D, x_BTD.ndim)
  d_x_BTD = rstd_BT1 * (
    g_BTD
    - jnp.mean(g_BTD, axis=-1, keepdims=True)
    - normed_BTD * jnp.mean(g_BTD * normed_BTD, axis=-1, keepdims=True)
  )
  rows = tuple(range(d_y_BTD.ndim - 1))
  d_scale_D = jnp.sum(d_y32_BTD * normed_BTD, axis=rows)
  d_bias_D = None if bias_D is None else jnp.sum(d_y32_BTD, axis=rows).astype(bias_D.dtype)
  return d_x_BTD.astype(x_BTD.dtype), d_scale_D.astype(scale_D.dtype), d_bias_D


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _along_last(v_D, ndim: int):
  """[D] as float32 [1, ..., 1, D] (`ndim` axes)."""
  return v_D.astype(jnp.float32).reshape((1,) * (ndim - 1) + v_D.shape)


class LayerNorm(nnx.Module):
  """LayerNorm over D with a learned scale (ones) and bias (zeros, unless `config.use_bias` is
  off), stored in param_dtype."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.epsilon, self.dtype = config.layer_norm_epsilon, jnp.dtype(config.dtype)
    d, w = config.d_model, jnp.dtype(config.param_dtype)
    self.scale = param(rngs, init.ones, (d,), (EMBED,), w)
    self.bias = param(rngs, init.zeros, (d,), (EMBED,), w) if config.use_bias else None

  def __call__(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    bias_D = None if self.bias is None else self.bias[...]
    y_BTD = layer_norm_BTD(x_BTD, self.scale[...], bias_D, self.epsilon)
    return y_BTD.astype(self.dtype)
