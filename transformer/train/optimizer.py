"""The Optax optimizer from the config: clipping, Adam(W) and the learning-rate schedule."""

from __future__ import annotations

import jax
import ml_collections
import optax

from transformer.train import schedule as schedules


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt = config.optimizer
  if opt.schedule == "rsqrt":
    return schedules.rsqrt_schedule(config.model.d_model, opt.warmup_steps, opt.lr_scale)
  if opt.schedule == "cosine":
    return schedules.warmup_cosine_schedule(opt.peak_learning_rate, opt.warmup_steps,
                                            config.num_train_steps)
  if opt.schedule == "constant":
    return optax.constant_schedule(opt.peak_learning_rate)
  raise ValueError(f"optimizer.schedule={opt.schedule!r} is unknown: use rsqrt, cosine or constant")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(b1=0.9, b2=0.98, eps=1e-9) with the paper's schedule by default (Section 5.3)."""
  opt = config.optimizer
  lr = learning_rate(config)
  if opt.name == "adam":
    core = optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  elif opt.name == "adamw":
    core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  else:
    raise ValueError(f"optimizer.name={opt.name!r} is unknown: use adam or adamw")
  # Gradient accumulation (optimizer.grad_accum_steps) is not here: the train step sums the
  # micro-batches' gradients itself and calls this optimizer once per update.
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core) \
      if opt.grad_clip_norm > 0 else core
  return with_standard_promotion(tx)


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
