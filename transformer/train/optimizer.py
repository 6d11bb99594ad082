"""The Optax optimizer of a run: clipping, Adam(W) and the learning-rate schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from transformer.config import OptimizerConfig
from transformer.train import schedule as schedules


def learning_rate(opt: OptimizerConfig, *, d_model: int, num_train_steps: int) -> optax.Schedule:
  """The schedule of `opt`, as a function of Adam's update count (from 0)."""
  if opt.schedule == "rsqrt":
    return schedules.rsqrt_schedule(d_model, opt.warmup_steps, opt.lr_scale)
  if opt.schedule == "cosine":
    return schedules.warmup_cosine_schedule(
      opt.peak_learning_rate, opt.warmup_steps, num_train_steps, opt.end_learning_rate
    )
  return optax.constant_schedule(opt.peak_learning_rate)


def make_optimizer(
  opt: OptimizerConfig, *, d_model: int, num_train_steps: int
) -> optax.GradientTransformation:
  """Adam(b1=0.9, b2=0.98, eps=1e-9) with the paper's schedule by default (Section 5.3).

  Gradient accumulation is not here: the train step sums its micro-batches' gradients and
  calls this optimizer once per update.
  """
  lr = learning_rate(opt, d_model=d_model, num_train_steps=num_train_steps)
  mask = matrices if opt.weight_decay_mask == "matrices" else None
  if opt.flat_state:
    # optax.adam(w)'s chain with the moments kept as one vector each (`flattened`), and the
    # mean and the clipping applied to that vector: a few long kernels instead of ~3 per
    # parameter array. The state is the per-array chain's: (clipping, (Adam, decay, rate)).
    decay = [optax.add_decayed_weights(opt.weight_decay, mask)] if opt.name == "adamw" else []
    core = optax.chain(
      flattened(
        scaled_and_clipped(
          optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps), opt.grad_clip_norm
        )
      ),
      *decay,
      optax.scale_by_learning_rate(lr),
    )
    tx = optax.chain(optax.identity(), core) if opt.grad_clip_norm > 0 else core
    return with_standard_promotion(tx)
  if opt.name == "adam":
    core = optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:
    core = optax.adamw(
      lr,
      b1=opt.b1,
      b2=opt.b2,
      eps=opt.eps,
      weight_decay=opt.weight_decay,
      mask=mask,
    )
  tx = (
    optax.chain(clip_by_global_norm(opt.grad_clip_norm), core) if opt.grad_clip_norm > 0 else core
  )
  return with_standard_promotion(tx)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` (the same updates and the same empty state) that takes the norm
  as `grad_norm=` when the caller has it: the train step computes the gradients' global norm for
  its finiteness check and its report, and summing every gradient's squares a second time cost
  ~70 more kernels a step (with the mean gradient formed in place, the shakespeare_char step
  compiled in 2.58 against 3.00 CPU s). Without `grad_norm` it computes the norm itself."""

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    trigger = jnp.squeeze(norm < max_norm)

    def clip(t):
      return jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def flattened(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`optax.flatten`: `inner` runs on the concatenation of the updates (its state too), passed
  the extra arguments. A caller that has the concatenation already gives it as `flat_updates=`
  (with `updates` only for their shapes): the train step makes it once for the gradients' norm,
  and a second one inside the update's branch cost a copy of every gradient."""

  def update(updates, state, params=None, *, flat_updates=None, **extra_args):
    del params  # the flat optimizer's transforms (mean, clipping, Adam) read none
    flat, unravel = ravel_pytree(updates)
    if flat_updates is not None:
      flat = flat_updates
    flat, state = inner.update(flat, state, None, **extra_args)
    return unravel(flat), state

  return optax.GradientTransformationExtraArgs(
    lambda params: inner.init(ravel_pytree(params)[0]), update
  )


def scaled_and_clipped(
  inner: optax.GradientTransformation, max_norm: float
) -> optax.GradientTransformationExtraArgs:
  """`inner` applied to the gradients times `grad_scale=` (1 when not given), clipped to a global
  norm of `max_norm` (none when <= 0) by `clip_by_global_norm`, with the norm of the scaled
  gradients given as `grad_norm=` or else computed. Its state is `inner`'s.

  Under `flattened` all of it runs on one vector: the train step hands over the summed
  gradients with grad_scale = 1 / tokens, and the mean, the clipping and Adam fuse into a few
  kernels, where the mean and the clipping of each array were ~3 kernels of their own (a third of
  the shakespeare_char step's ~400).
  """

  clip = clip_by_global_norm(max_norm)

  def update(updates, state, params=None, *, grad_norm=None, grad_scale=None, **extra_args):
    del extra_args
    if grad_scale is not None:
      updates = jax.tree.map(lambda g: g * grad_scale.astype(g.dtype), updates)
    if max_norm > 0:
      updates, _ = clip.update(updates, optax.EmptyState(), grad_norm=grad_norm)
    return inner.update(updates, state, params)

  return optax.GradientTransformationExtraArgs(inner.init, update)


def matrices(params):
  """True for the parameters of 2 or more dimensions (projections, embeddings), False for
  biases and LayerNorm scales: the ones GPT-2 and nanoGPT leave undecayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def with_standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` traced under JAX's standard dtype promotion, its state unchanged.

  Optax's bias correction raises a Python float to the int32 step count, which
  `jax_numpy_dtype_promotion="strict"` rejects; programs (and this project's tests) that turn
  strict promotion on would otherwise fail inside the optimizer rather than in their own code.
  """

  def init(params):
    with jax.numpy_dtype_promotion("standard"):
      return tx.init(params)

  def update(updates, state, params=None, **extra_args):
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init, update)
