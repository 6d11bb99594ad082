"""Learning-rate schedules: the paper's warm-up then inverse square root, and warm-up + cosine."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def rsqrt_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
  """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (Section 5.3).

  Steps count from 1 (optax counts updates from 0): the rate rises linearly for `warmup_steps`
  steps, peaks at scale * (d_model * warmup_steps)^-0.5, then decays as 1/sqrt(step).
  """

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

  return schedule


def warmup_cosine_schedule(
  peak_value: float, warmup_steps: int, total_steps: int, end_value: float = 0.0
) -> optax.Schedule:
  """Linear warm-up to `peak_value`, then cosine decay to `end_value` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
    0.0, peak_value, warmup_steps, max(total_steps, warmup_steps + 1), end_value
  )
