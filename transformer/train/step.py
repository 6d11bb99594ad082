"""Pure training and evaluation steps: `train_step(state, batch) -> (state, metrics)`.

The model lives as (graphdef, params): the step merges them into an NNX module, computes the
task's loss, and returns new arrays. No I/O, no Python branching on values, so the loop can jit
it once with explicit shardings and donate the old state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from transformer.data.tokenizer import BOS_ID, PAD_ID
from transformer.train.loss import token_metrics

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
  """Everything that changes during training and is checkpointed."""

  step: jax.Array  # int32 scalar: updates applied so far
  params: nnx.State  # the model's nnx.Param variables
  opt_state: optax.OptState


def shift_right(
  ids_BT: jax.Array, positions_BT: jax.Array | None = None, bos_id: int = BOS_ID
) -> jax.Array:
  """Teacher forcing: the decoder reads BOS, y_1, ..., y_{T-1} and predicts y_1, ..., y_T.

  In packed rows (`positions_BT` counts from 0 in each pair) every pair starts with its own BOS
  instead of the last token of the pair before it.
  """
  shifted_BT = jnp.concatenate([jnp.full_like(ids_BT[:, :1], bos_id), ids_BT[:, :-1]], axis=1)
  if positions_BT is None:
    return shifted_BT
  return jnp.where(positions_BT == 0, bos_id, shifted_BT)


def _translation(model, batch: Batch):
  targets_BT = batch["targets"]
  # Packed rows carry segments and positions of both sides; unpacked ones call the model
  # with the two sequences alone, as a model without packing support (the LSTM baseline) takes.
  decoder_in_BT = shift_right(targets_BT, batch.get("targets_positions"))
  packing = {
    keyword: batch[key]
    for keyword, key in (
      ("src_segments_BS", "inputs_segments"),
      ("tgt_segments_BT", "targets_segments"),
      ("src_positions_BS", "inputs_positions"),
      ("tgt_positions_BT", "targets_positions"),
    )
    if key in batch
  }
  logits_BTV = model(batch["inputs"], decoder_in_BT, **packing)
  return logits_BTV, targets_BT, (targets_BT != PAD_ID).astype(jnp.float32)


def _language_model(model, batch: Batch):
  targets_BT = batch["targets"]
  # Windows of running text bring their own inputs (the id before each target, never a BOS);
  # sentences are read from BOS.
  inputs_BT = batch["inputs"] if "inputs" in batch else shift_right(targets_BT)
  return model(inputs_BT), targets_BT, (targets_BT != PAD_ID).astype(jnp.float32)


def _masked_language_model(model, batch: Batch):
  # Only the selected positions count (BERT): weights mark them.
  return model.mlm_logits(batch["inputs"]), batch["targets"], batch["weights"]


TASK_OUTPUTS: dict[str, Callable] = {
  "translation": _translation,
  "lm": _language_model,
  "mlm": _masked_language_model,
}


class Steps(NamedTuple):
  """The pure functions of one model graph and task (see `make_steps`).

  Every batch is [B, ...]. With `grad_accum_steps` = k > 1 a training batch holds the rows of k
  micro-batches, and `gradients` splits it (`micro_batches`). `gradients` and `train_step` draw
  the dropout masks from `key` when given, else from `dropout_key`: a compiled step that takes
  the key as an argument holds no constant of the seed, so runs of every seed share it.
  """

  gradients: Callable  # (params, batch, step, device=None, key=None) -> (grads, metric sums)
  apply: Callable  # (state, summed grads, metric sums) -> (state, metrics)
  train_step: Callable  # (state, batch, key=None) -> (state, metrics)
  eval_step: Callable  # (params, batch) -> metric sums
  dropout_key: jax.Array
  grad_accum_steps: int = 1


def dropout_key_as(key: jax.Array, impl: str | None) -> jax.Array:
  """`key` as a key of the PRNG implementation `impl` ("threefry2x32", "rbg", "unsafe_rbg"):
  itself if it already is one (or `impl` is None), else a key of `impl` made of bits drawn from
  it. A pure function of `key`, so the masks stay a function of the seed and the step.
  """
  if impl is None or jax.random.key_impl(key) == impl:
    return key
  data_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape
  return jax.random.wrap_key_data(jax.random.bits(key, data_shape, jnp.uint32), impl=impl)


def micro_batches(batch: Batch, k: int) -> Batch:
  """[k B, ...] -> [k, B, ...]: micro-batch i takes rows i, i + k, i + 2k, ...

  Strided, not consecutive, rows: a device holding a contiguous block of the batch's rows (as
  the data-parallel shardings lay them out) then holds B / devices rows of every micro-batch, so
  the split moves no data between devices.
  """

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split into {k} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_steps(
  graphdef: nnx.GraphDef,
  rest: nnx.State,
  tx: optax.GradientTransformation,
  *,
  task: str,
  label_smoothing: float,
  dropout_key: jax.Array,
  grad_accum_steps: int = 1,
  flat_optimizer: bool = False,
) -> Steps:
  """Builds the pure training and evaluation functions for one model graph and task.

  `rest` is the model's non-parameter state (dropout RNG streams), reseeded at every step from
  `dropout_key` and the step number, so a resumed run draws exactly the same dropout masks. The
  masks are drawn with the PRNG of the model's `config.resolved_dropout_rng` (a key of another
  implementation is converted, `dropout_key_as`); a model without one uses `dropout_key`'s.
  Gradients are of the *summed* token loss; `apply` divides by the token count. Data-parallel
  paths can so add gradients and counts across devices, and gradient accumulation across
  micro-batches, before one exact division: k micro-batches make one update on a batch k times
  larger, whatever their token counts. `flat_optimizer`: `tx` is `make_optimizer`'s with
  `optimizer.flat_state`, which takes the summed gradients with grad_scale = 1 / tokens and runs
  on their concatenation (`optimizer.scaled_and_clipped`), for parameters whole on every device;
  any other optimizer would ignore grad_scale and step by the summed gradients.
  """
  outputs = TASK_OUTPUTS[task]
  tx = optax.with_extra_args_support(tx)  # any optimizer takes (or ignores) grad_norm=

  def summed_loss(params, batch, key):
    model = nnx.merge(graphdef, params, rest, copy=True)
    config = getattr(model, "config", None)
    key = dropout_key_as(key, getattr(config, "resolved_dropout_rng", None))
    # Stacked layers (model.scan_layers) hold one stream key per layer: "match_shape" splits
    # the step's key over them; a scalar stream gets the key exactly as with "scalars_only".
    nnx.reseed(model, dropout=key, policy="match_shape")
    logits_BTV, targets_BT, weights_BT = outputs(model, batch)
    sums = token_metrics(logits_BTV, targets_BT, weights_BT, label_smoothing)
    return sums["loss_sum"], sums

  micro_gradients = jax.grad(summed_loss, has_aux=True)

  def accumulate(params, batch, key):
    """Gradient and metric sums over the k micro-batches of `batch`: a scan holds the
    activations of one micro-batch at a time, and each draws its own dropout masks."""
    stacked = micro_batches(batch, grad_accum_steps)

    def add(totals, indexed):
      i, micro = indexed
      grads_sums = micro_gradients(params, micro, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, totals, grads_sums), None

    first = jax.tree.map(lambda x: x[0], stacked)
    shapes = jax.eval_shape(micro_gradients, params, first, key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    totals, _ = jax.lax.scan(add, zeros, (jnp.arange(grad_accum_steps), stacked))
    return totals

  def gradients(params, batch, step, device=None, key=None):
    """Gradients of the summed loss and the metric sums of one update's batch.

    `device` (a data-parallel index) draws different dropout masks on each device of a
    per-device program; each micro-batch also gets its own masks.
    """
    key = jax.random.fold_in(dropout_key if key is None else key, step)
    if device is not None:
      key = jax.random.fold_in(key, device)
    if grad_accum_steps == 1:
      return micro_gradients(params, batch, key)
    return accumulate(params, batch, key)

  def apply(state: TrainState, grads, sums) -> tuple[TrainState, dict[str, jax.Array]]:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    if flat_optimizer:
      # The summed gradients as one vector, made once for the norm and for the optimizer, which
      # takes it as it is (`optimizer.flattened`) and divides it by the token count itself.
      carried, unravel = ravel_pytree(grads)
      grad_norm = optax.tree.norm(carried) / tokens
      given = unravel
      extra = lambda carried: {"grad_scale": 1.0 / tokens, "flat_updates": carried}
    else:
      # The mean gradient is formed where it is read, in the norm's reductions and the update's
      # kernels, which XLA fuses it into: made once before them it cost a kernel per array.
      carried = grads
      given = lambda grads: jax.tree.map(lambda g: g / tokens, grads)
      extra = lambda carried: {}
      grad_norm = optax.tree.norm(given(grads))
    # A non-finite loss or gradient leaves parameters and optimizer untouched; the loop reads
    # `nonfinite` and stops or skips according to the config, with the last good state in hand.
    finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)

    def update(state, carried):
      # The norm is passed on to the optimizer's clipping (`optimizer.clip_by_global_norm`,
      # `optimizer.scaled_and_clipped`).
      updates, opt_state = tx.update(
        given(carried), state.opt_state, state.params, grad_norm=grad_norm, **extra(carried)
      )
      return optax.apply_updates(state.params, updates), opt_state

    def selected(state, carried):
      # Accelerators fuse the select into the update's kernels, and branch on the device only
      # after a copy of `finite` to the host.
      new = update(state, carried)
      old = (state.params, state.opt_state)
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    def branched(state, carried):
      # On the CPU every array's select is a kernel of its own (~200 of them: 1.2-2.5 ms of a
      # ~47 ms step of the shakespeare_char model on one core): a branch skips the update.
      keep = lambda state, carried: (state.params, state.opt_state)
      return jax.lax.cond(finite, update, keep, state, carried)

    params, opt_state = jax.lax.platform_dependent(state, carried, cpu=branched, default=selected)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {
      **sums,
      "grad_norm": grad_norm,
      "steps": jnp.ones((), jnp.int32),
      "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics

  def train_step(
    state: TrainState, batch: Batch, key: jax.Array | None = None
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    return apply(state, *gradients(state.params, batch, state.step, key=key))

  def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    logits_BTV, targets_BT, weights_BT = outputs(model, batch)
    return token_metrics(logits_BTV, targets_BT, weights_BT, label_smoothing)

  return Steps(gradients, apply, train_step, eval_step, dropout_key, grad_accum_steps)
