"""Recurrent baselines with the Transformer's interfaces: LSTM and GRU layers over [B, T, D], and an
LSTM encoder-decoder with additive attention (Bahdanau et al., 2015; the 2015 NMT baseline).

Besides the package's dimension key, this file uses G for the gates stacked in one kernel (4 for
the LSTM: input, forget, candidate, output; 3 for the GRU: reset, update, candidate) and I for a
layer's input width where it may differ from its hidden width D.

Every layer computes x_t W_x for all t as one [B T, I] x [I, G D] matmul before the loop (as cuDNN
does): only h_{t-1} W_h stays on the T-step sequential path, which `jax.lax.scan` runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from transformer.errors import UserError
from transformer.model.masks import MASKED


def _gate_params(rngs: nnx.Rngs, in_features: int, features: int, gates: int):
  """Input kernel [I, G, D] (LeCun normal), recurrent kernel [D, G, D] (orthogonal per gate)."""
  init_in = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
  orthogonal = nnx.initializers.orthogonal()
  recurrent_DGD = jnp.stack(
    [orthogonal(rngs.params(), (features, features)) for _ in range(gates)], axis=1
  )
  return (
    nnx.Param(init_in(rngs.params(), (in_features, gates, features))),
    nnx.Param(recurrent_DGD),
  )


def lstm_cell(
  xw_BGD: Float[Array, "B 4 D"],
  hw_BGD: Float[Array, "B 4 D"],
  h_BD: Float[Array, "B D"],
  c_BD: Float[Array, "B D"],
) -> tuple[Float[Array, "B D"], Float[Array, "B D"]]:
  """One LSTM step from the gate pre-activations of the input (x_t W_x + b) and the state
  (h_{t-1} W_h):

    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (x_t W_x + b + h_{t-1} W_h)
    c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)
  """
  del h_BD  # enters through hw_BGD only
  gates_BGD = xw_BGD + hw_BGD
  i_BD, f_BD, o_BD = (jax.nn.sigmoid(gates_BGD[:, k]) for k in (0, 1, 3))
  c_BD = f_BD * c_BD + i_BD * jnp.tanh(gates_BGD[:, 2])
  return o_BD * jnp.tanh(c_BD), c_BD


def gru_cell(
  xw_BGD: Float[Array, "B 3 D"], hw_BGD: Float[Array, "B 3 D"], h_BD: Float[Array, "B D"]
) -> Float[Array, "B D"]:
  """One GRU step (Cho et al., 2014, in cuDNN's form: the reset gate scales h W_hn + b_hn).

    r, z = sigmoid(x W_xr + b_r + h W_hr), sigmoid(x W_xz + b_z + h W_hz)
    n = tanh(x W_xn + b_n + r * (h W_hn + b_hn)),   h_t = (1 - z) * n + z * h_{t-1}

  hw_BGD is h_{t-1} W_h with b_hn already added to its candidate slice.
  """
  r_BD = jax.nn.sigmoid(xw_BGD[:, 0] + hw_BGD[:, 0])
  z_BD = jax.nn.sigmoid(xw_BGD[:, 1] + hw_BGD[:, 1])
  n_BD = jnp.tanh(xw_BGD[:, 2] + r_BD * hw_BGD[:, 2])
  return (1.0 - z_BD) * n_BD + z_BD * h_BD


def _time_major(x_BT_: jax.Array) -> jax.Array:
  return jnp.swapaxes(x_BT_, 0, 1)


def _hidden(carry):
  """h of an LSTM carry (h, c) or of a GRU carry h."""
  return carry[0] if isinstance(carry, tuple) else carry


def _masked(keep_B, new, old):
  return jax.tree.map(lambda n, o: jnp.where(keep_B[:, None], n, o), new, old)


def _recurrent_gates(h_BD, recurrent_DGD, recurrent_bias_GD=None):
  """h_{t-1} W_h (+ b_h): the incoming state plays the role of an input of width I = D."""
  hw_BGD = jnp.einsum("BI,IGD->BGD", h_BD, recurrent_DGD)
  return hw_BGD if recurrent_bias_GD is None else hw_BGD + recurrent_bias_GD[None]


def scan_recurrence(cell, carry, xw_TBGD, recurrent_DGD, recurrent_bias_GD, keep_TB, reverse):
  """Runs `carry = cell(xw_t, h_{t-1} W_h + b_h, *carry)` over T; a False `keep` entry leaves the
  carry as it was (a reversed pass over right-padded rows so starts at the last real token).

  Returns (h_TBD, final carry). Differentiated by JAX's scan transpose, which adds each step's
  h_{t-1}^T dz_t into dW_h inside the loop: a [D, G D] read-modify-write per step.
  """

  def step(carry, x):
    xw_BGD, keep_B = x
    hw_BGD = _recurrent_gates(_hidden(carry), recurrent_DGD, recurrent_bias_GD)
    carry = _masked(keep_B, _as_carry(cell(xw_BGD, hw_BGD, *_as_tuple(carry)), carry), carry)
    return carry, _hidden(carry)

  carry, h_TBD = jax.lax.scan(step, carry, (xw_TBGD, keep_TB), reverse=reverse)
  return h_TBD, carry


def _as_tuple(carry):
  return carry if isinstance(carry, tuple) else (carry,)


def _as_carry(out, like):
  return tuple(out) if isinstance(like, tuple) else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def recurrence(cell, carry, xw_TBGD, recurrent_DGD, recurrent_bias_GD, keep_TB, reverse):
  """`scan_recurrence` with cuDNN's backward: the loop only carries dh (and dc) back through
  h_{t-1} W_h and emits dz_t = d(h_{t-1} W_h + b_h); dW_h = sum_t h_{t-1}^T dz_t is then one
  [D, T B] x [T B, G D] matmul after the loop instead of T small updates inside it."""
  return scan_recurrence(cell, carry, xw_TBGD, recurrent_DGD, recurrent_bias_GD, keep_TB, reverse)


def _recurrence_fwd(cell, carry, xw_TBGD, recurrent_DGD, recurrent_bias_GD, keep_TB, reverse):
  def step(carry, x):
    xw_BGD, keep_B = x
    hw_BGD = _recurrent_gates(_hidden(carry), recurrent_DGD, recurrent_bias_GD)
    new = _masked(keep_B, _as_carry(cell(xw_BGD, hw_BGD, *_as_tuple(carry)), carry), carry)
    # Saved per step: the carry it started from and h W_h + b_h (no matmul in the backward).
    return new, (_hidden(new), carry, hw_BGD)

  final, (h_TBD, previous_TB, hw_TBGD) = jax.lax.scan(
    step, carry, (xw_TBGD, keep_TB), reverse=reverse
  )
  residuals = (previous_TB, xw_TBGD, hw_TBGD, recurrent_DGD, keep_TB)
  return (h_TBD, final), residuals


def _recurrence_bwd(cell, reverse, residuals, cotangents):
  previous_TB, xw_TBGD, hw_TBGD, recurrent_DGD, keep_TB = residuals
  d_h_TBD, d_final = cotangents
  # W_h^T as a row-major [G D, I] matrix, made once outside the loop: XLA:CPU would otherwise
  # re-pack the transposed [I, G D] operand on every step (measured 25x slower at B = 1).
  recurrent_T = recurrent_DGD.reshape(recurrent_DGD.shape[0], -1).T

  def step(d_carry, x):
    previous, xw_BGD, hw_BGD, keep_B, d_h_BD = x
    d_new = _add_to_hidden(d_carry, d_h_BD)
    call = lambda carry, xw, hw: _as_carry(cell(xw, hw, *_as_tuple(carry)), carry)
    _, vjp = jax.vjp(call, previous, xw_BGD, hw_BGD)
    d_cell = jax.tree.map(lambda d: jnp.where(keep_B[:, None], d, 0.0), d_new)
    d_previous, d_xw_BGD, d_hw_BGD = vjp(d_cell)
    # Masked steps pass the carry through: its gradient flows straight back.
    d_previous = jax.tree.map(
      lambda a, d: a + jnp.where(keep_B[:, None], 0.0, d), d_previous, d_new
    )
    d_h_previous = d_hw_BGD.reshape(d_hw_BGD.shape[0], -1) @ recurrent_T
    return _add_to_hidden(d_previous, d_h_previous), (d_xw_BGD, d_hw_BGD)

  d_carry, (d_xw_TBGD, d_hw_TBGD) = jax.lax.scan(
    step, d_final, (previous_TB, xw_TBGD, hw_TBGD, keep_TB, d_h_TBD), reverse=not reverse
  )
  d_recurrent_DGD = jnp.einsum("TBI,TBGD->IGD", _hidden(previous_TB), d_hw_TBGD)
  return d_carry, d_xw_TBGD, d_recurrent_DGD, d_hw_TBGD.sum((0, 1)), None


def _add_to_hidden(d_carry, d_h_BD):
  if isinstance(d_carry, tuple):
    return (d_carry[0] + d_h_BD,) + tuple(d_carry[1:])
  return d_carry + d_h_BD


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


class _Recurrent(nnx.Module):
  """Shared parts of the LSTM and GRU layers: the hoisted input projection and the masked loop.

  `weight_grads_in_loop=True` differentiates the plain scan with JAX's own scan transpose, for
  comparison with the default cuDNN-style backward of `recurrence`.
  """

  gates: int

  def __init__(
    self, in_features: int, features: int, *, rngs: nnx.Rngs, weight_grads_in_loop: bool = False
  ):
    self.features, self.weight_grads_in_loop = features, weight_grads_in_loop
    self.input_kernel, self.recurrent_kernel = _gate_params(rngs, in_features, features, self.gates)
    self.bias = nnx.Param(self._initial_bias(features))

  def _initial_bias(self, features: int) -> jax.Array:
    return jnp.zeros((self.gates, features), jnp.float32)

  def _recurrent_bias(self) -> Float[Array, "G D"]:
    return jnp.zeros((self.gates, self.features), jnp.float32)

  def input_gates(self, x_BTI: Float[Array, "B T I"]) -> Float[Array, "B T G D"]:
    """x_t W_x + b for every position at once: one large matmul off the sequential path."""
    return jnp.einsum("BTI,IGD->BTGD", x_BTI, self.input_kernel[...]) + self.bias[...][None, None]

  def _run(self, cell, carry, x_BTI, mask_BT, reverse):
    keep_TB = (
      jnp.ones(x_BTI.shape[1::-1], jnp.bool_)
      if mask_BT is None
      else _time_major(mask_BT.astype(jnp.bool_))
    )
    run = scan_recurrence if self.weight_grads_in_loop else recurrence
    h_TBD, carry = run(
      cell,
      carry,
      _time_major(self.input_gates(x_BTI)),
      self.recurrent_kernel[...],
      self._recurrent_bias(),
      keep_TB,
      reverse,
    )
    return _time_major(h_TBD), carry


class LSTM(_Recurrent):
  """One LSTM layer (Hochreiter & Schmidhuber, 1997, with the forget gate of Gers et al.).

  `__call__(x [B, T, I]) -> h [B, T, D]`, a drop-in for a self-attention layer of width D = I.
  """

  gates = 4

  def _initial_bias(self, features: int) -> jax.Array:
    # Forget-gate bias 1 (Jozefowicz et al., 2015): the cell starts by remembering.
    return jnp.zeros((4, features), jnp.float32).at[1].set(1.0)

  def __call__(
    self,
    x_BTI: Float[Array, "B T I"],
    mask_BT: Bool[Array, "B T"] | None = None,
    *,
    reverse: bool = False,
    initial_state=None,
    return_state: bool = False,
  ):
    """Args: x_BTI the inputs; mask_BT False at padding (the state passes through unchanged);
    reverse: run from the last position to the first; initial_state (h_BD, c_BD), zeros if None.
    Returns h_BTD, and with `return_state` also the final (h_BD, c_BD)."""
    if initial_state is None:
      zeros_BD = jnp.zeros((x_BTI.shape[0], self.features), jnp.float32)
      initial_state = (zeros_BD, zeros_BD)
    h_BTD, state = self._run(lstm_cell, tuple(initial_state), x_BTI, mask_BT, reverse)
    return (h_BTD, state) if return_state else h_BTD


class CudnnLSTM(LSTM):
  """`LSTM` run by cuDNN's fused kernel (`jax.experimental.rnn.lstm`; NVIDIA GPUs only).

  The same parameters and the same function as `LSTM` (gate order i, f, g, o is PyTorch's and
  cuDNN's), packed into cuDNN's flat weight vector on every call, so a trained `LSTM`'s state
  loads into it unchanged. cuDNN runs the whole recurrence, forward and backward, as one kernel
  sequence; its float32 matmuls may use TF32 unless `jax_default_matmul_precision` is "highest".
  Padding must be on the right: a mask enters as per-row lengths.
  """

  def cudnn_weights(self) -> Float[Array, " P"]:
    """cuDNN's layout for one unidirectional layer: W_ih [4D, I], W_hh [4D, D], b_ih, b_hh."""
    w_ih = self.input_kernel[...].reshape(self.input_kernel.shape[0], -1).T
    w_hh = self.recurrent_kernel[...].reshape(self.features, -1).T
    return jnp.concatenate(
      [
        w_ih.ravel(),
        w_hh.ravel(),
        self.bias[...].ravel(),
        jnp.zeros((4 * self.features,), jnp.float32),
      ]
    )

  # Narrower than LSTM's: cuDNN's kernel runs forward only, from a zero state.
  def __call__(  # type: ignore[override]
    self, x_BTI: Float[Array, "B T I"], mask_BT: Bool[Array, "B T"] | None = None
  ):
    from jax.experimental import rnn  # imports cuDNN bindings; only GPU programs need them

    batch, length, in_features = x_BTI.shape
    lengths_B = (
      jnp.full((batch,), length, jnp.int32)
      if mask_BT is None
      else jnp.sum(mask_BT, axis=1, dtype=jnp.int32)
    )
    zeros_1BD = jnp.zeros((1, batch, self.features), jnp.float32)
    h_BTD, _, _ = rnn.lstm(
      x_BTI.astype(jnp.float32),
      zeros_1BD,
      zeros_1BD,
      self.cudnn_weights(),
      lengths_B,
      input_size=in_features,
      hidden_size=self.features,
      num_layers=1,
      dropout=0.0,
      bidirectional=False,
    )
    return h_BTD


class GRU(_Recurrent):
  """One GRU layer: `__call__(x [B, T, I]) -> h [B, T, D]`, as `LSTM` with 3 gates and no cell."""

  gates = 3

  def __init__(
    self, in_features: int, features: int, *, rngs: nnx.Rngs, weight_grads_in_loop: bool = False
  ):
    super().__init__(in_features, features, rngs=rngs, weight_grads_in_loop=weight_grads_in_loop)
    self.recurrent_bias = nnx.Param(jnp.zeros((features,), jnp.float32))

  def _recurrent_bias(self) -> Float[Array, "G D"]:
    # b_hn sits inside the reset gate's product, so it joins h W_h rather than x W_x + b.
    return jnp.zeros((3, self.features), jnp.float32).at[2].set(self.recurrent_bias[...])

  def __call__(
    self,
    x_BTI: Float[Array, "B T I"],
    mask_BT: Bool[Array, "B T"] | None = None,
    *,
    reverse: bool = False,
    initial_state=None,
    return_state: bool = False,
  ):
    h_BD = (
      jnp.zeros((x_BTI.shape[0], self.features), jnp.float32)
      if initial_state is None
      else initial_state
    )
    h_BTD, state = self._run(gru_cell, h_BD, x_BTI, mask_BT, reverse)
    return (h_BTD, state) if return_state else h_BTD


@dataclasses.dataclass(frozen=True)
class RNNConfig:
  """Sizes of the LSTM encoder-decoder.

  Attributes:
    vocab_size: V, one vocabulary and embedding table for source and target, tied to the output
      layer (as the Transformer's `share_embeddings` and `tie_output`).
    d_model: D, the embedding width, the decoder's state width, and the width of the encoder's
      output (a forward and a backward LSTM of D / 2 each, concatenated); must be even.
    num_encoder_layers, num_decoder_layers: stacked LSTM layers on each side.
    dropout_rate: on the embeddings, between encoder layers and before the output layer (never
      on the recurrent connections, Zaremba et al., 2014).
    pad_id: padding id; padded source positions are skipped by the encoder and never attended to.
    max_len: the longest target the decoders may generate (an RNN has no positional table; this
      only bounds decoding, as `TransformerConfig.max_len` does).
  """

  vocab_size: int = 8192
  d_model: int = 512
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  dropout_rate: float = 0.1
  pad_id: int = 0
  max_len: int = 256

  def __post_init__(self):
    if self.d_model % 2 or self.d_model <= 0:
      raise UserError(
        f"d_model={self.d_model} must be positive and even (two directions of "
        "d_model / 2 in the encoder)"
      )
    if self.num_encoder_layers < 1 or self.num_decoder_layers < 1:
      raise UserError("the LSTM encoder-decoder needs at least one layer on each side")

  def replace(self, **changes) -> RNNConfig:
    return dataclasses.replace(self, **changes)

  def num_parameters(self) -> int:
    """The parameter count of `LSTMSeq2Seq(self)`, from the shapes below (tested against it)."""
    d, h = self.d_model, self.d_model // 2
    lstm = lambda i, n, g=4: i * g * n + n * g * n + g * n  # input, recurrent kernels, bias
    encoder = 2 * self.num_encoder_layers * lstm(d, h)  # a forward and a backward LSTM
    decoder = lstm(d, d) + d * 4 * d + (self.num_decoder_layers - 1) * lstm(d, d)
    bridge, attention, output = h * d + d, 2 * d * d + d, 2 * d * d + d
    return self.vocab_size * d + encoder + decoder + bridge + attention + output

  @classmethod
  def with_num_parameters(cls, num_parameters: int, vocab_size: int, **overrides) -> RNNConfig:
    """The config whose (even) d_model brings the parameter count closest to `num_parameters`."""
    count = lambda d: cls(vocab_size=vocab_size, d_model=d, **overrides).num_parameters()
    d = 2
    while count(d + 2) <= num_parameters:  # the count grows with d: stop at the crossing
      d += 2
    if abs(count(d + 2) - num_parameters) < abs(count(d) - num_parameters):
      d += 2
    return cls(vocab_size=vocab_size, d_model=d, **overrides)


class BiLSTMEncoder(nnx.Module):
  """Stacked bidirectional LSTM: embedded source [B, S, D] -> annotations [B, S, D] (the paper's
  h_j = [forward h_j ; backward h_j])."""

  def __init__(self, config: RNNConfig, *, rngs: nnx.Rngs):
    h = config.d_model // 2
    self.forward_layers = nnx.List(
      [LSTM(config.d_model, h, rngs=rngs) for _ in range(config.num_encoder_layers)]
    )
    self.backward_layers = nnx.List(
      [LSTM(config.d_model, h, rngs=rngs) for _ in range(config.num_encoder_layers)]
    )
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, x_BSD: Float[Array, "B S D"], mask_BS: Bool[Array, "B S"]):
    for index, (forward, backward) in enumerate(zip(self.forward_layers, self.backward_layers)):
      if index:
        x_BSD = self.dropout(x_BSD)
      x_BSD = jnp.concatenate(
        [forward(x_BSD, mask_BS), backward(x_BSD, mask_BS, reverse=True)], axis=-1
      )
    return x_BSD


class AttentionDecoder(nnx.Module):
  """Stacked LSTM decoder with additive attention over the encoder's annotations.

    e_tj = v^T tanh(W_q s_{t-1} + W_k h_j),  alpha_t = softmax_j(e_t),  c_t = sum_j alpha_tj h_j
    s_t = LSTM([y_{t-1} ; c_t], s_{t-1}),    out_t = tanh(W_o [s_t ; c_t])

  s_{t-1} is the top layer's previous state; c_t enters the first layer's input. W_k h_j, the
  embeddings' share of the first layer's gates and the output layer run outside the loop.
  """

  def __init__(self, config: RNNConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.layers = nnx.List([LSTM(d, d, rngs=rngs) for _ in range(config.num_decoder_layers)])
    glorot = nnx.initializers.xavier_uniform()
    self.context_kernel = nnx.Param(
      nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))(
        rngs.params(), (d, 4, d)
      )
    )
    # s_0 = tanh(W_s backward h_1) as in Bahdanau et al.: the backward pass has read the source.
    self.bridge_kernel = nnx.Param(glorot(rngs.params(), (d // 2, d)))
    self.bridge_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
    self.query_kernel = nnx.Param(glorot(rngs.params(), (d, d)))
    self.key_kernel = nnx.Param(glorot(rngs.params(), (d, d)))
    self.score_vector = nnx.Param(glorot(rngs.params(), (d, 1))[:, 0])
    self.output_kernel = nnx.Param(glorot(rngs.params(), (2 * d, d)))
    self.output_bias = nnx.Param(jnp.zeros((d,), jnp.float32))
    # Filled by init_cache; declared as data so the decoding state is part of the module's state.
    # Filled by init_cache.
    self.hidden: Any = nnx.data(None)
    self.cell: Any = nnx.data(None)
    self.cross_attention: Any = nnx.data(None)

  def _initial_state(self, memory_BSD):
    summary_BI = memory_BSD[:, 0, memory_BSD.shape[-1] // 2 :]
    s0_BD = jnp.tanh(summary_BI @ self.bridge_kernel[...] + self.bridge_bias[...][None])
    return tuple((s0_BD, jnp.zeros_like(s0_BD)) for _ in self.layers)

  def _step(self, states, xw_BGD, keys_BSD, memory_BSD, memory_mask_BS):
    """One decoder step: attend with the top state s_{t-1}, then run the LSTM stack.

    xw_BGD is the embedded y_{t-1}'s share of the first layer's gates (with its bias).
    Returns the new (h, c) per layer and (s_t, c_t).
    """
    query_BD = states[-1][0] @ self.query_kernel[...]
    scores_BS = jnp.einsum(
      "BSD,D->BS", jnp.tanh(keys_BSD + query_BD[:, None]), self.score_vector[...]
    )
    weights_BS = jax.nn.softmax(jnp.where(memory_mask_BS, scores_BS, MASKED), axis=-1)
    context_BD = jnp.einsum("BS,BSD->BD", weights_BS, memory_BSD)
    x_BGD = xw_BGD + jnp.einsum("BI,IGD->BGD", context_BD, self.context_kernel[...])
    new_states: list[tuple[jax.Array, jax.Array]] = []
    for index, (layer, state) in enumerate(zip(self.layers, states)):
      if index:
        x_BGD = (
          jnp.einsum("BI,IGD->BGD", new_states[-1][0], layer.input_kernel[...])
          + layer.bias[...][None]
        )
      new_states.append(
        lstm_cell(x_BGD, _recurrent_gates(state[0], layer.recurrent_kernel[...]), *state)
      )
    return tuple(new_states), (new_states[-1][0], context_BD)

  def _output(self, s_BTD, context_BTD):
    both_BTI = jnp.concatenate([s_BTD, context_BTD], axis=-1)
    return jnp.tanh(both_BTI @ self.output_kernel[...] + self.output_bias[...][None, None])

  def __call__(
    self,
    y_BTD: Float[Array, "B T D"],
    memory_BSD: Float[Array, "B S D"],
    memory_mask_BS: Bool[Array, "B S"],
  ) -> Float[Array, "B T D"]:
    """Embedded decoder inputs y_{t-1} [B, T, D] -> out_t [B, T, D] (before the vocabulary)."""
    keys_BSD = jnp.einsum("BSI,ID->BSD", memory_BSD, self.key_kernel[...])
    xw_TBGD = _time_major(self.layers[0].input_gates(y_BTD))
    step = lambda states, xw_BGD: self._step(states, xw_BGD, keys_BSD, memory_BSD, memory_mask_BS)
    _, (s_TBD, context_TBD) = jax.lax.scan(step, self._initial_state(memory_BSD), xw_TBGD)
    return self._output(_time_major(s_TBD), _time_major(context_TBD))

  def init_cache(self, memory_BSD: Float[Array, "B S D"], memory_mask_BS: Bool[Array, "B S"]):
    """Prepares step-by-step decoding: the recurrent state is the RNN's whole "KV cache".

    h and c are stored [B, L, D], rows first like every other decoding cache, so beam search
    can reorder them along axis 0 (`transformer.decode.gather_beams`).
    """
    states = self._initial_state(memory_BSD)
    self.hidden = nnx.Cache(jnp.stack([h for h, _ in states], axis=1))
    self.cell = nnx.Cache(jnp.stack([c for _, c in states], axis=1))
    keys_BSD = jnp.einsum("BSI,ID->BSD", memory_BSD, self.key_kernel[...])
    self.cross_attention = AttentionMemory(keys_BSD, memory_BSD, memory_mask_BS)

  def decode_step(self, y_B1D: Float[Array, "B 1 D"]) -> Float[Array, "B 1 D"]:
    """out_t for the one new input y_{t-1}, advancing the cached state (after `init_cache`)."""
    memory = self.cross_attention
    hidden_BLD, cell_BLD = self.hidden[...], self.cell[...]
    states = tuple((hidden_BLD[:, l], cell_BLD[:, l]) for l in range(len(self.layers)))
    xw_BGD = self.layers[0].input_gates(y_B1D)[:, 0]
    states, (s_BD, context_BD) = self._step(
      states, xw_BGD, memory.keys[...], memory.memory[...], memory.mask[...]
    )
    self.hidden[...] = jnp.stack([h for h, _ in states], axis=1)
    self.cell[...] = jnp.stack([c for _, c in states], axis=1)
    return self._output(s_BD[:, None], context_BD[:, None])


class AttentionMemory(nnx.Module):
  """What decoding reads but never changes: projected keys W_k h_j, annotations h_j, and their
  mask. Named `cross_attention` in the decoder, so `transformer.decode.cache` keeps it out of
  the loop carry as it does the Transformer's cross-attention cache."""

  def __init__(self, keys_BSD, memory_BSD, mask_BS):
    self.keys, self.memory, self.mask = (
      nnx.Cache(keys_BSD),
      nnx.Cache(memory_BSD),
      nnx.Cache(mask_BS),
    )


class LSTMSeq2Seq(nnx.Module):
  """The LSTM encoder-decoder with attention, called like `EncoderDecoder`.

  `__call__(src_ids [B, S], decoder input ids [B, T]) -> logits [B, T, V]`; one embedding table
  serves source, target and (transposed) the output layer. `encode`, `decode` and `init_cache`
  follow `EncoderDecoder`'s, so `transformer.decode`'s greedy decoder runs it with its recurrent
  state as the cache (`use_cache=True`) or by rerunning the decoder over the prefix, and its
  beam search reorders that state between beams.
  """

  def __init__(self, config: RNNConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedding = nnx.Param(
      nnx.initializers.normal(config.d_model**-0.5)(
        rngs.params(), (config.vocab_size, config.d_model)
      )
    )
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
    self.encoder = BiLSTMEncoder(config, rngs=rngs)
    self.decoder = AttentionDecoder(config, rngs=rngs)

  def embed(self, ids_BT: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    return self.dropout(jnp.take(self.embedding[...], ids_BT, axis=0))

  def encode(self, src_ids_BS: Int[Array, "B S"]) -> Float[Array, "B S D"]:
    return self.encoder(self.embed(src_ids_BS), src_ids_BS != self.config.pad_id)

  def decode(
    self,
    tgt_ids_BT: Int[Array, "B T"],
    memory_BSD: Float[Array, "B S D"] | None = None,
    src_ids_BS: Int[Array, "B S"] | None = None,
    *,
    use_cache: bool = False,
  ) -> Float[Array, "B T V"]:
    """Logits [B, T, V] of the decoder inputs (BOS, y_1, ...) given the encoder's output.

    With `use_cache=True` (after `init_cache`), `tgt_ids` is the one new position [B, 1] and
    memory and source come from the cache (leave them None).
    """
    y_BTD = self.embed(tgt_ids_BT)
    if use_cache:
      out_BTD = self.decoder.decode_step(y_BTD)
    elif memory_BSD is None or src_ids_BS is None:
      raise ValueError("decoding without the cache needs the memory and the source ids")
    else:
      out_BTD = self.decoder(y_BTD, memory_BSD, src_ids_BS != self.config.pad_id)
    return jnp.einsum("BTD,VD->BTV", self.dropout(out_BTD), self.embedding[...])

  def init_cache(
    self, memory_BSD: Float[Array, "B S D"], src_ids_BS: Int[Array, "B S"], cache_length: int
  ) -> None:
    """Prepares step-by-step decoding (`cache_length` is only checked: the state has no length)."""
    if cache_length > self.config.max_len:
      raise UserError(f"cannot decode {cache_length} positions: max_len is {self.config.max_len}")
    self.decoder.init_cache(memory_BSD, src_ids_BS != self.config.pad_id)

  def __call__(
    self, src_ids_BS: Int[Array, "B S"], tgt_ids_BT: Int[Array, "B T"]
  ) -> Float[Array, "B T V"]:
    return self.decode(tgt_ids_BT, self.encode(src_ids_BS), src_ids_BS)
