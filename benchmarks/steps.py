"""The train step as the benchmarks build and time it: the fixed model sizes, the FLOP formula,
synthetic batches, and the project's own pure step (`transformer.train.step`) with Adam."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import common
from transformer import TransformerConfig
from transformer.train.step import TrainState, make_steps

FLOP_FORMULA = (
  "6 B [S (L_enc (4 D^2 + 2 D F) + L_dec 2 D^2) + T (L_dec (6 D^2 + 2 D F) + D V)]"
  " + 12 B D [L_enc S^2 + L_dec (T^2 + T S)]; output projection counted, embedding "
  "lookup, biases, norms, softmax, dropout, loss and optimizer not counted"
)
CONFIGS = {
  "tiny": TransformerConfig.tiny,
  "small": TransformerConfig.small,
  "base": TransformerConfig.base,
}


def compute_dtype() -> str:
  """The training dtype of the backend: bfloat16 on accelerators, float32 on CPU."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def random_batch(vocab_size: int, batch: int, src_len: int, tgt_len: int, seed: int = 0):
  """Full-length rows of ids >= 4 (no PAD/BOS/EOS/UNK), so every position is a counted token."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "inputs": jax.random.randint(k1, (batch, src_len), 4, vocab_size, jnp.int32),
    "targets": jax.random.randint(k2, (batch, tgt_len), 4, vocab_size, jnp.int32),
  }


def adam() -> optax.GradientTransformation:
  """The paper's Adam (beta2 0.98, eps 1e-9); a constant rate, as the schedule costs nothing."""
  return optax.adam(1e-4, b1=0.9, b2=0.98, eps=1e-9)


def build_step(model: nnx.Module, tx=None, dropout_seed: int = 0):
  """(steps, initial TrainState): the same pure steps as the training loop, Adam, dropout on.
  `dropout_seed` picks the key of the dropout masks; their PRNG is the model's
  `config.dropout_rng` (see `transformer.train.step.make_steps`)."""
  tx = tx or adam()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  steps = make_steps(
    graphdef,
    rest,
    tx,
    task="translation",
    label_smoothing=0.1,
    dropout_key=jax.random.key(dropout_seed),
  )
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return steps, state


def time_train_step(steps, state, batch, runs: int):
  """(Timing, XLA's memory analysis, XLA's FLOP count) of the donated train step: compiled
  (timed apart), then timed on steps that feed their state on."""
  compiled, compile_s = common.compile_jitted(steps.train_step, state, batch, donate_argnums=0)
  timing = common.time_stateful_step(compiled, state, batch, runs=runs, compile_s=compile_s)
  return timing, common.compiled_memory(compiled), common.compiled_flops(compiled)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
