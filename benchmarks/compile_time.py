"""Compile time of the train step with the stacks unrolled and scanned (model.scan_layers).

For each repetition, in alternating order, the base model's train step (Adam, dropout on) is
traced and compiled from scratch (`jax.jit(...).lower(...).compile()`, no compilation cache),
then timed over a few steps. Reported: median seconds to lower, to compile, their sum, the size
of the optimised HLO (instructions), and the step time, for each of the two.

  python -m benchmarks.compile_time [--config base] [--batch 8] [--length 32] [--repeats 2]
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
from flax import nnx

from benchmarks import common
from benchmarks.steps import CONFIGS, build_step, compute_dtype, random_batch
from transformer import EncoderDecoder


def compile_once(config, batch_size: int, length: int, runs: int) -> dict:
  """Seconds to lower and to compile one train step, its HLO size, and its step time."""
  steps, state = build_step(EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1)))
  batch = random_batch(config.vocab_size, batch_size, length, length)
  start = time.perf_counter()
  lowered = jax.jit(steps.train_step, donate_argnums=0).lower(state, batch)
  lowered_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lowered_s
  timing = common.time_stateful_step(compiled, state, batch, runs=runs)
  return {
    "lower_s": lowered_s,
    "compile_s": compile_s,
    "total_s": lowered_s + compile_s,
    "hlo_instructions": (compiled.as_text() or "").count("\n  "),
    "step_s": timing.median_s,
  }


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument("--config", choices=tuple(CONFIGS), default=None)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  args = common.parse_args(parser, argv)
  jax.config.update("jax_enable_compilation_cache", False)
  name = args.config or ("tiny" if args.preset == "quick" else "base")
  rows: dict[str, list[dict]] = {"unrolled": [], "scanned": []}
  for repeat in range(args.repeats):
    order = ("unrolled", "scanned") if repeat % 2 == 0 else ("scanned", "unrolled")
    for layout in order:
      config = CONFIGS[name](dtype=compute_dtype(), scan_layers=layout == "scanned")
      rows[layout].append(compile_once(config, args.batch, args.length, args.runs))
      row = rows[layout][-1]
      print(
        f"{layout:8s} lower {row['lower_s']:.1f} s  compile {row['compile_s']:.1f} s  "
        f"HLO {row['hlo_instructions']:,} lines  step {row['step_s'] * 1e3:.0f} ms",
        flush=True,
      )
  medians = {
    layout: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    for layout, runs in rows.items()
  }
  ratio = medians["unrolled"]["total_s"] / medians["scanned"]["total_s"]
  print(f"lower + compile: unrolled / scanned = {ratio:.2f}x")
  common.write_json(
    f"compile_time_{name}",
    args.preset,
    {
      "config": name,
      "batch": args.batch,
      "length": args.length,
      "statistic": f"median of {args.repeats} compilations each, alternating order",
      "runs": rows,
      "medians": medians,
      "unrolled_over_scanned_total": ratio,
    },
    args.out,
  )


if __name__ == "__main__":
  sys.exit(main())
