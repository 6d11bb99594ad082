"""What a train step costs and what the machine can do: model FLOPs, parameter memory, the peak
matmul rate MFU is measured against.

Model FLOPs of one train step of the encoder-decoder (forward + backward = 3 x forward; every
multiply-add is 2 FLOPs):

  6 B [ S (L_enc (4 D^2 + 2 D F) + L_dec 2 D^2) + T (L_dec (6 D^2 + 2 D F) + D V) ]
  + 12 B D [ L_enc S^2 + L_dec (T^2 + T S) ]

Counted: the Q, K, V and output projections (in cross-attention Q and the output over the T
target positions, K and V over the S memory positions), the feed-forward network, the score and
value products over the full [T, S] matrix (the implementation computes the masked causal half
too), and the tied output projection to the vocabulary. Not counted: the embedding lookup,
biases, LayerNorm, softmax, dropout, the loss and the optimizer. The benchmarks report MFU with
the same formula (benchmarks/README.md).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.model.config import TransformerConfig
from transformer.model.transformer import create_model

FLOP_FORMULA = (
  "6 B [S (L_enc (4 D^2 + 2 D F) + L_dec 2 D^2) + T (L_dec (6 D^2 + 2 D F) + D V)]"
  " + 12 B D [L_enc S^2 + L_dec (T^2 + T S)]; output projection counted, embedding "
  "lookup, biases, norms, softmax, dropout, loss and optimizer not counted"
)
# Dense 16-bit tensor-core rate by the vendors' datasheets (no sparsity), FLOP/s.
DATASHEET_BF16 = {
  "H100": 989.4e12,
  "H200": 989.4e12,
  "A100": 312e12,
  "TPU v5": 197e12,
  "TPU v4": 275e12,
}


def train_flops(config: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
  """Model FLOPs of one forward + backward pass of the encoder-decoder (module docstring)."""
  d, f, v = config.d_model, config.d_ff, config.vocab_size
  enc, dec = config.num_encoder_layers, config.num_decoder_layers
  per_source = enc * (4 * d * d + 2 * d * f) + dec * 2 * d * d
  per_target = dec * (6 * d * d + 2 * d * f) + d * v
  dense = 6 * batch * (src_len * per_source + tgt_len * per_target)
  scores = 12 * batch * d * (enc * src_len**2 + dec * (tgt_len**2 + tgt_len * src_len))
  return float(dense + scores)


def step_flops(task: str, config: TransformerConfig, batch: dict) -> float:
  """Model FLOPs of one train step on `batch` (its arrays' shapes: rows x length), by the
  formula of the module docstring for each family: the decoder-only model has no encoder and
  no cross-attention, the encoder-only one no decoder (its masked-LM head: D^2 + D V a token)."""
  d, f, v = config.d_model, config.d_ff, config.vocab_size
  if task == "translation":
    (rows, s_len), t_len = batch["inputs"].shape, batch["targets"].shape[1]
    return train_flops(config, rows, s_len, t_len)
  rows, length = batch["targets"].shape
  if task == "lm":
    layers = config.num_decoder_layers
    per_token = layers * (4 * d * d + 2 * d * f) + d * v
  else:
    layers = config.num_encoder_layers
    per_token = layers * (4 * d * d + 2 * d * f) + d * d + d * v
  return float(6 * rows * length * per_token + 12 * rows * d * layers * length**2)


def parameter_count(task: str, config: TransformerConfig) -> int:
  """How many parameters the task's model has, found without allocating them."""
  abstract = nnx.eval_shape(lambda: create_model(task, config, seed=0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def datasheet_peak() -> float | None:
  """The 16-bit matmul rate of this device by its datasheet, where known."""
  kind = jax.devices()[0].device_kind
  return next((rate for name, rate in DATASHEET_BF16.items() if name in kind), None)


def measured_matmul_peak(dtype=jnp.float32, n: int = 2048, runs: int = 5) -> float:
  """FLOP/s of an n x n matmul in `dtype` on the first device: the median of `runs` timed calls
  after a warm-up, each synchronised."""
  # Two distinct random operands, as `benchmarks/common.matmul_peak` times them: a @ a reads
  # one buffer instead of two and ran ~10% faster on a CPU, which inflated the peak.
  device = jax.devices()[0]
  # Drawn by NumPy: jax.random would compile a sampler for the shape (0.2 s on a CPU core).
  a, b = (
    jax.device_put(
      jnp.asarray(np.random.default_rng(i).standard_normal((n, n), np.float32), dtype), device
    )
    for i in (0, 1)
  )
  matmul = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / sorted(times)[len(times) // 2]


def available_memory_bytes() -> int | None:
  """Memory one device can hold: its allocator's limit on a GPU/TPU, the host's available memory
  on the CPU (shared by its virtual devices); None where unknown."""
  device = jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")
  try:
    for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError):
    pass
  return (
    None
    if not hasattr(os, "sysconf")
    else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  )
