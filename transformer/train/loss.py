"""Label-smoothed cross-entropy (Section 5.4) and the token metrics reported during training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def label_smoothed_cross_entropy(logits_BTV: Float[Array, "B T V"], targets_BT: Int[Array, "B T"],
                                 smoothing: float) -> Float[Array, "B T"]:
  """-sum_v q_v log p_v with q = (1 - eps) one_hot(target) + eps / V, per position.

  Smoothing "hurts perplexity, as the model learns to be more unsure, but improves accuracy and
  BLEU" (Section 5.4); `token_metrics` therefore also reports the unsmoothed NLL.
  """
  log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]
  uniform_BT = -jnp.mean(log_probs_BTV, axis=-1)
  return (1.0 - smoothing) * nll_BT + smoothing * uniform_BT


def token_metrics(logits_BTV: Float[Array, "B T V"], targets_BT: Int[Array, "B T"],
                  weights_BT: Float[Array, "B T"], smoothing: float) -> dict[str, jax.Array]:
  """Sums over the real (weighted) tokens; divide by `tokens` to average across batches."""
  loss_BT = label_smoothed_cross_entropy(logits_BTV, targets_BT, smoothing)
  nll_BT = label_smoothed_cross_entropy(logits_BTV, targets_BT, 0.0)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return {"loss_sum": jnp.sum(loss_BT * weights_BT), "nll_sum": jnp.sum(nll_BT * weights_BT),
          "correct_sum": jnp.sum(correct_BT * weights_BT), "tokens": jnp.sum(weights_BT)}


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Turns summed metrics into per-token loss, NLL, perplexity and accuracy."""
  tokens = max(float(sums["tokens"]), 1.0)
  nll = float(sums["nll_sum"]) / tokens
  return {"loss": float(sums["loss_sum"]) / tokens, "nll": nll,
          "perplexity": float(jnp.exp(jnp.minimum(nll, 50.0))),
          "accuracy": float(sums["correct_sum"]) / tokens, "tokens": float(sums["tokens"])}
