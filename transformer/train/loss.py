"""Label-smoothed cross-entropy (Section 5.4) and the token metrics reported during training."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def label_smoothed_cross_entropy(
  logits_BTV: Float[Array, "B T V"], targets_BT: Int[Array, "B T"], smoothing: float
) -> Float[Array, "B T"]:
  """-sum_v q_v log p_v with q = (1 - eps) one_hot(target) + eps / V, per position.

  Smoothing "hurts perplexity, as the model learns to be more unsure, but improves accuracy and
  BLEU" (Section 5.4); `token_metrics` therefore also reports the unsmoothed NLL.
  """
  return _losses(logits_BTV, targets_BT, smoothing)[0]


@functools.partial(jax.named_call, name="cross_entropy")  # a name for profiles
def _logit_stats(logits_BTV, targets_BT):
  """max, log-sum-exp, mean and target logit per position: the only reductions over V that the
  loss, the NLL and the accuracy need (with log p = logits - lse, no [B, T, V] log-probabilities
  are written)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  max_BT = jnp.max(logits_BTV, axis=-1)
  lse_BT = max_BT + jnp.log(jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1))
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return max_BT, lse_BT, jnp.mean(logits_BTV, axis=-1), target_BT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _losses(logits_BTV, targets_BT, smoothing: float):
  """(smoothed loss, NLL, correct) per position, from one set of reductions over V.

  The backward writes d logits = (g_loss + g_nll) softmax - (g_loss (1 - eps) + g_nll) one_hot
  - g_loss eps / V in one elementwise pass (one_hot as an iota comparison, not a scatter), so the
  [B, T, V] arrays of a step are the logits and their gradient alone: on a GPU the vocabulary-wide
  passes of autodiff's version took a quarter of the base model's step.
  """
  return _from_stats(_logit_stats(logits_BTV, targets_BT), smoothing)


def _from_stats(stats, smoothing: float):
  max_BT, lse_BT, mean_BT, target_BT = stats
  nll_BT = lse_BT - target_BT
  loss_BT = (1.0 - smoothing) * nll_BT + smoothing * (lse_BT - mean_BT)
  # The target is a most likely token (a tie counts as correct, unlike argmax's first index).
  return loss_BT, nll_BT, (target_BT >= max_BT).astype(jnp.float32)


def _losses_fwd(logits_BTV, targets_BT, smoothing):
  stats = _logit_stats(logits_BTV, targets_BT)
  return _from_stats(stats, smoothing), (logits_BTV, targets_BT, stats[1])


@functools.partial(jax.named_call, name="cross_entropy")  # a name for profiles
def _losses_bwd(smoothing, residuals, cotangents):
  logits_BTV, targets_BT, lse_BT = residuals
  d_loss_BT, d_nll_BT, _ = cotangents  # "correct" is piecewise constant: no gradient
  vocab = logits_BTV.shape[-1]
  probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - lse_BT[..., None])
  is_target_BTV = jnp.arange(vocab)[None, None] == targets_BT[..., None]
  d_BTV = (
    (d_loss_BT + d_nll_BT)[..., None] * probs_BTV
    - jnp.where(is_target_BTV, (d_loss_BT * (1.0 - smoothing) + d_nll_BT)[..., None], 0.0)
    - (d_loss_BT * smoothing / vocab)[..., None]
  )
  return d_BTV.astype(logits_BTV.dtype), None


_losses.defvjp(_losses_fwd, _losses_bwd)


def token_metrics(
  logits_BTV: Float[Array, "B T V"],
  targets_BT: Int[Array, "B T"],
  weights_BT: Float[Array, "B T"],
  smoothing: float,
) -> dict[str, jax.Array]:
  """Sums over the real (weighted) tokens; divide by `tokens` to average across batches."""
  loss_BT, nll_BT, correct_BT = _losses(logits_BTV, targets_BT, smoothing)
  return {
    "loss_sum": jnp.sum(loss_BT * weights_BT),
    "nll_sum": jnp.sum(nll_BT * weights_BT),
    "correct_sum": jnp.sum(correct_BT * weights_BT),
    "tokens": jnp.sum(weights_BT),
  }


def summarize(sums: Mapping[str, float | np.ndarray | np.generic | jax.Array]) -> dict[str, float]:
  """Turns summed metrics into per-token loss, NLL, perplexity and accuracy."""
  tokens = max(float(sums["tokens"]), 1.0)
  nll = float(sums["nll_sum"]) / tokens
  return {
    "loss": float(sums["loss_sum"]) / tokens,
    "nll": nll,
    "perplexity": float(jnp.exp(jnp.minimum(nll, 50.0))),
    "accuracy": float(sums["correct_sum"]) / tokens,
    "tokens": float(sums["tokens"]),
  }
