"""Train-step throughput per mesh layout: data, FSDP, tensor, their products, and shard_map.

On a CPU the devices are virtual (`--xla_force_host_platform_device_count`, set here before JAX
is imported), so all layouts share the same cores: the numbers compare the layouts' overheads
(collectives, resharding, per-device memory), not real speed-ups. On a GPU node they are the
real thing. Each layout: compile timed apart, warm-up, median of >= 5 synchronised steps.

  python benchmarks/scaling.py [--preset quick|full] [--devices 8]
"""

from __future__ import annotations

import argparse
import os
import sys


def _device_count(argv: list[str]) -> int | None:
  """--devices N, read before JAX is imported: the virtual CPU device count is an XLA flag that
  must be set before the CPU backend starts."""
  pre = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]), add_help=False)
  pre.add_argument("--devices", type=int, nargs="?", const=0, default=None)
  devices = pre.parse_known_args(argv)[0].devices
  if devices is not None and devices < 1:
    pre.error("--devices takes a positive number of virtual CPU devices, e.g. --devices 8")
  return devices


# Only as a script: imported, JAX may already run, and sys.argv is another program's.
DEVICES = _device_count(sys.argv[1:]) if __name__ == "__main__" else None
if DEVICES is not None:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
  ).strip()
elif "JAX_PLATFORMS" not in os.environ and "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common
from transformer import EncoderDecoder, TransformerConfig
from transformer.parallel.config import ParallelConfig
from transformer.parallel.mesh import global_batch, make_mesh
from transformer.parallel.sharding import shard
from transformer.parallel.strategies import compile_train_step
from transformer.train.setup import initial_state
from transformer.train.step import make_steps

LAYOUTS = [
  ("1 device", dict(data=1), "jit", 1),
  ("data 8", dict(data=8), "jit", 8),
  ("fsdp 8", dict(fsdp=8), "jit", 8),
  ("tensor 8", dict(tensor=8), "jit", 8),
  ("data 2 x tensor 4", dict(data=2, tensor=4), "jit", 8),
  ("data 2 x fsdp 2 x tensor 2", dict(data=2, fsdp=2, tensor=2), "jit", 8),
  ("shard_map data 8", dict(data=8), "shard_map", 8),
]


def measure(
  config: TransformerConfig,
  axes: dict,
  strategy: str,
  devices: int,
  rows: int,
  length: int,
  runs: int,
) -> dict:
  full = {"data": 1, "fsdp": 1, "tensor": 1, **axes}
  mesh = make_mesh(ParallelConfig(**full), jax.devices()[:devices])
  model = EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1))
  tx = optax.adam(1e-4)
  state, shardings = shard(initial_state(model, tx), mesh)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  steps = make_steps(
    graphdef, rest, tx, task="translation", label_smoothing=0.1, dropout_key=jax.random.key(0)
  )
  step = compile_train_step(strategy, steps, shardings, mesh)
  rng = np.random.default_rng(0)
  host = {
    k: rng.integers(4, config.vocab_size, (rows, length)).astype(np.int32)
    for k in ("inputs", "targets")
  }
  with jax.set_mesh(mesh):
    batch = global_batch(host, mesh)
    compiled, compile_s = common.compile_timed(step, state, batch)
    timing = common.time_stateful_step(compiled, state, batch, runs=runs, compile_s=compile_s)
  return {
    "tokens_per_second": rows * length / timing.median_s,
    "timing": timing,
    "compiled_step_memory_per_device": common.compiled_memory(compiled),
  }


def main(argv=None) -> None:
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--devices",
    type=int,
    default=None,
    help="virtual CPU devices (default 8); read from the command line before JAX starts",
  )
  args = common.parse_args(parser, argv)
  quick = args.preset == "quick"
  config = (
    TransformerConfig.tiny(
      vocab_size=1024,
      d_model=128,
      num_heads=8,
      d_ff=512,
      num_encoder_layers=2,
      num_decoder_layers=2,
      dropout_rate=0.1,
    )
    if quick
    else TransformerConfig.small(vocab_size=8192, num_encoder_layers=2, num_decoder_layers=2)
  )
  rows, length = (16, 32) if quick else (32, 64)
  available = jax.device_count()
  results = []
  for name, axes, strategy, devices in LAYOUTS:
    if devices > available:
      continue
    result = measure(config, axes, strategy, devices, rows, length, args.runs)
    results.append(
      {"layout": name, "mesh": axes, "strategy": strategy, "devices": devices, **result}
    )
    print(
      f"{name:28s} {result['tokens_per_second']:10.0f} tok/s  "
      f"compile {result['timing'].compile_s:5.1f} s"
    )
  common.write_json(
    "scaling",
    args.preset,
    {
      "config": config.__dict__,
      "batch": {"rows": rows, "source_length": length, "target_length": length},
      "note": (
        "virtual CPU devices share the host's cores: compares layout overheads, not speed-ups"
      )
      if jax.default_backend() == "cpu"
      else "",
      "results": results,
    },
    args.out,
  )


if __name__ == "__main__":
  main()
