"""A tiny translation model trained for a few steps on a fixed batch under any mesh layout.

Shared by the sharding tests and the multi-process worker, so both run the very same program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer.parallel.config import ParallelConfig
from transformer.parallel.mesh import global_batch, make_mesh
from transformer.parallel.sharding import shard
from transformer.parallel.strategies import compile_train_step
from transformer.train.setup import initial_state
from transformer.train.step import make_steps

CONFIG = TransformerConfig.tiny(
  vocab_size=64,
  d_model=64,
  num_heads=8,
  d_ff=128,
  num_encoder_layers=1,
  num_decoder_layers=1,
  dropout_rate=0.0,
)
ROWS, LENGTH = 16, 8


def mesh_of(data=1, fsdp=1, tensor=1, devices=None):
  return make_mesh(ParallelConfig(data=data, fsdp=fsdp, tensor=tensor), devices)


def fixed_batch(step: int) -> dict[str, np.ndarray]:
  """Global batch number `step`: random ids with some right padding."""
  rng = np.random.default_rng(step)
  batch = {
    k: rng.integers(4, CONFIG.vocab_size, size=(ROWS, LENGTH)).astype(np.int32)
    for k in ("inputs", "targets")
  }
  batch["inputs"][::3, 5:] = 0
  batch["targets"][::4, 6:] = 0
  return batch


def local_rows(batch, process_index: int, process_count: int):
  rows = ROWS // process_count
  return {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}


def setup(mesh, strategy: str = "jit"):
  model = EncoderDecoder(CONFIG, rngs=nnx.Rngs(params=0, dropout=1))
  # SGD with momentum, not Adam: Adam's first step is lr * g / (|g| + eps), which turns the
  # float32 rounding differences of reductions split across devices (large relative to tiny
  # gradients such as the key bias's, zero in exact arithmetic) into differences of up to lr.
  tx = optax.sgd(0.5, momentum=0.9)
  state, shardings = shard(initial_state(model, tx), mesh)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  steps = make_steps(
    graphdef, rest, tx, task="translation", label_smoothing=0.1, dropout_key=jax.random.key(0)
  )
  return state, shardings, compile_train_step(strategy, steps, shardings, mesh)


def train(mesh, num_steps: int, strategy: str = "jit"):
  """Losses of `num_steps` steps and the final state."""
  state, _, step = setup(mesh, strategy)
  losses = []
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      batch = local_rows(fixed_batch(i), jax.process_index(), jax.process_count())
      state, metrics = step(state, global_batch(batch, mesh))
      losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))
  return losses, state


def checksum(tree) -> float:
  """Sum of |x| over every array, computed on the (possibly multi-process) global arrays."""
  leaves = jax.tree.leaves(tree)
  return float(jax.jit(lambda xs: sum(jnp.sum(jnp.abs(x)) for x in xs))(leaves))
