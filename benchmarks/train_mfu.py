"""Train-step throughput and MFU of the encoder-decoder (tiny, small, base) against the matmul peak
measured in the same run.

Model FLOPs of one train step (forward + backward = 3 x forward; every multiply-add is 2 FLOPs):

  6 B [ S (L_enc (4 D^2 + 2 D F) + L_dec 2 D^2) + T (L_dec (6 D^2 + 2 D F) + D V) ]
  + 12 B D [ L_enc S^2 + L_dec (T^2 + T S) ]

What is counted, per layer: the Q, K, V and output projections (4 D^2 per token; in the decoder's
cross-attention Q and output run over the T target positions and K, V over the S memory
positions), the feed-forward network (2 D F), and the score and value products Q K^T and P V
(2 T S D each, over the full [T, S] matrix: the causal mask hides half of the decoder's
self-attention scores but the implementation computes them all). Once per target token: the
output projection to the vocabulary (D V, tied to the embedding; it counts). Not counted: the
embedding lookup (a gather), biases, LayerNorm, softmax, dropout, the loss and the Adam update.

MFU = model FLOPs per step / step seconds / measured peak FLOP/s, where the peak is the median
rate of a large matmul in the step's compute dtype (float32 on CPU, bfloat16 on GPU) timed by
this same process, once before and once after the steps; the higher of the two is used. On GPUs
whose datasheet rate is known the MFU against it is reported too (the convention of MaxText and
the PaLM paper), which is lower than against the measured peak.

On a GPU the steps run as the GPU recipe trains: bfloat16 compute with float32 parameters and
Adam state, cuDNN flash attention (attention="auto"), and the model's defaults for the logits
(float32, the loss in float32 too) and the dropout PRNG (threefry2x32); `--logits_dtype auto
--rng_impl auto` gives bfloat16 logits and rbg masks with bfloat16 compute. Besides the fixed
"small" row (B = 32 pairs of 64 tokens, for comparison across projects) the base model runs at
larger batches; B = 384 pairs of 64 tokens is about the paper's 25k source + 25k target tokens.

Memory, per row: `compiled_step_memory` is XLA's buffer assignment of that row's compiled step
(arguments + outputs + temporaries - donated aliases; `peak_bytes` is their total), on every
backend. `process_peak_bytes` (GPU/TPU only) is the allocator's peak since the process started:
it is never reset, so it includes the matmul peak and every earlier row, not this row alone.

  python -m benchmarks.train_mfu [--preset quick|full]
"""

from __future__ import annotations

import sys
from typing import Any

import jax
from flax import nnx

from benchmarks import common
from benchmarks.steps import (
  CONFIGS,
  FLOP_FORMULA,
  build_step,
  compute_dtype,
  count_params,
  random_batch,
  time_train_step,
)
from transformer import EncoderDecoder, TransformerConfig
from transformer.train.flops import datasheet_peak, train_flops

# Rows of (config, batch B, length S = T); `breakdown` times the pieces of that row's step.
PRESETS = {
  "quick": dict(rows=(("tiny", 4, 16), ("small", 4, 16)), breakdown=("small", 4, 16)),
  "full": dict(
    rows=(("tiny", 32, 64), ("small", 32, 64), ("base", 32, 64)), breakdown=("small", 32, 64)
  ),
}
PRESETS_GPU = {
  "quick": dict(rows=(("tiny", 8, 32), ("base", 32, 64)), breakdown=("base", 32, 64)),
  "full": dict(
    rows=(
      ("tiny", 32, 64),
      ("small", 32, 64),
      ("base", 32, 64),
      ("base", 128, 64),
      ("base", 384, 64),
    ),
    breakdown=("base", 384, 64),
  ),
}


def breakdown(config: TransformerConfig, batch, runs: int) -> dict:
  """Times the step's pieces, to show where the time outside the counted matmuls goes:
  the forward pass and loss alone (eval mode, no dropout), forward + backward with dropout, and
  the whole step without dropout (the step with dropout is the main measurement)."""
  pieces = {}
  steps, state = build_step(EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1)))
  for piece, fn in (
    ("forward_eval", steps.eval_step),
    ("gradients", lambda p, b: steps.gradients(p, b, state.step)),
  ):
    pieces[piece] = common.time_jitted(fn, state.params, batch, runs=runs)[0].as_dict()
  no_dropout = EncoderDecoder(config.replace(dropout_rate=0.0), rngs=nnx.Rngs(params=0, dropout=1))
  pieces["train_step_dropout_0"] = time_train_step(*build_step(no_dropout), batch, runs)[
    0
  ].as_dict()
  print(
    "  breakdown: " + ", ".join(f"{k} {v['median_s'] * 1e3:.0f} ms" for k, v in pieces.items()),
    flush=True,
  )
  return pieces


def parse_row(text: str, parser) -> tuple[str, int, int]:
  """CONFIG:BATCH:LENGTH, checked before anything runs (a bad row would otherwise fail deep in
  the model, after the matmul peak)."""
  name, _, sizes = text.partition(":")
  batch, _, length = sizes.partition(":")
  if name not in CONFIGS or not batch.isdigit() or not length.isdigit():
    parser.error(
      f"--rows {text!r}: write CONFIG:BATCH:LENGTH with CONFIG one of "
      f"{', '.join(CONFIGS)}, e.g. base:384:64"
    )
  batch, length = int(batch), int(length)
  if batch < 1 or length < 1:
    parser.error(f"--rows {text!r}: BATCH and LENGTH must be positive, e.g. {name}:32:64")
  max_len = CONFIGS[name]().max_len
  if length > max_len:
    parser.error(
      f"--rows {text!r}: LENGTH {length} exceeds the {name} config's max_len "
      f"{max_len}; use a LENGTH of at most {max_len}"
    )
  return name, batch, length


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--breakdown",
    action="store_true",
    help="also time the pieces of one row's step (the preset's `breakdown`)",
  )
  parser.add_argument(
    "--rows",
    nargs="*",
    metavar="CONFIG:B:L",
    help="measure these rows instead of the preset's, e.g. base:384:64",
  )
  # Variants of the step, applied to every row (each is one flag to try on a new device).
  parser.add_argument(
    "--attention",
    choices=("auto", "xla", "cudnn", "blockwise"),
    default="auto",
    help="attention implementation (default: auto)",
  )
  parser.add_argument(
    "--logits_dtype",
    choices=("auto", "float32", "bfloat16"),
    default=None,
    help="dtype of the [B, T, V] logits (the loss reduces in float32 anyway); default: the "
    "model's; auto: bfloat16 with bfloat16 compute",
  )
  parser.add_argument(
    "--rng_impl",
    choices=("auto", "threefry2x32", "rbg", "unsafe_rbg"),
    default=None,
    help="PRNG of the dropout masks; default: the model's; auto: rbg with bfloat16 compute",
  )
  parser.add_argument(
    "--scan_layers",
    action="store_true",
    help="each stack as one nnx.scan over stacked layers (compiles one layer per stack)",
  )
  args = common.parse_args(parser, argv)
  preset = dict((PRESETS if jax.default_backend() == "cpu" else PRESETS_GPU)[args.preset])
  if args.rows:
    preset["rows"] = tuple(parse_row(row, parser) for row in args.rows)
  dtype = compute_dtype()
  variant: dict[str, Any] = {
    "dtype": dtype,
    "attention": args.attention,
    "scan_layers": args.scan_layers,
  }
  # Unset flags leave the model's defaults, so that the default run measures the default step.
  if args.logits_dtype is not None:
    variant["logits_dtype"] = args.logits_dtype
  if args.rng_impl is not None:
    variant["dropout_rng"] = args.rng_impl
  # The peak is measured before and after the steps and the higher rate is the denominator: on
  # a shared VM one window can land in a slow phase, which would inflate every MFU.
  peaks_before = common.matmul_peaks(quick=args.preset == "quick")
  print(
    f"matmul peak {dtype}: {common.human(peaks_before[dtype]['flop_per_s'], 'FLOP/s')}", flush=True
  )
  rows = []
  for name, batch_size, length in preset["rows"]:
    config = CONFIGS[name](**variant)
    model = EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1))
    batch = random_batch(config.vocab_size, batch_size, length, length)
    steps, state = build_step(model)
    timing, memory, xla_flops = time_train_step(steps, state, batch, args.runs)
    flops = train_flops(config, batch_size, length, length)
    rows.append(
      {
        "config": name,
        "model": {
          k: getattr(config, k)
          for k in (
            "vocab_size",
            "d_model",
            "num_heads",
            "d_ff",
            "num_encoder_layers",
            "num_decoder_layers",
            "dropout_rate",
            "attention",
            "dtype",
            "param_dtype",
            "logits_dtype",
            "dropout_rng",
            "scan_layers",
          )
        },
        "resolved_logits_dtype": config.resolved_logits_dtype,
        "dropout_rng_impl": config.resolved_dropout_rng,
        "parameters": count_params(model),
        "batch": batch_size,
        "source_length": length,
        "target_length": length,
        "flops_per_step": flops,
        "tokens_per_s": batch_size * 2 * length / timing.median_s,
        "target_tokens_per_s": batch_size * length / timing.median_s,
        "model_flop_per_s": flops / timing.median_s,
        "xla_cost_analysis_flops": xla_flops,
        "compiled_step_memory": memory,
        "process_peak_bytes": common.process_peak_bytes(),
        "timing": timing.as_dict(),
      }
    )
    print(
      f"  {name:5s} B={batch_size:<4d} {rows[-1]['parameters'] / 1e6:.3g}M params  "
      f"step {timing.median_s * 1e3:.1f} ms  {common.human(rows[-1]['tokens_per_s'])}tok/s  "
      f"{common.human(rows[-1]['model_flop_per_s'])}FLOP/s  compile {timing.compile_s:.1f}s",
      flush=True,
    )
    del model, steps, state
  peaks_after = common.matmul_peaks(quick=args.preset == "quick")
  peaks = max(peaks_before, peaks_after, key=lambda p: p[dtype]["flop_per_s"])
  peak, sheet = peaks[dtype]["flop_per_s"], datasheet_peak()
  print(
    f"matmul peak {dtype}: {common.human(peaks_after[dtype]['flop_per_s'], 'FLOP/s')} "
    f"after the steps; MFU against {common.human(peak, 'FLOP/s')}",
    flush=True,
  )
  for row in rows:
    row["mfu"] = common.mfu(row["flops_per_step"], row["timing"]["median_s"], peak)
    row["mfu_vs_f32_matmul"] = common.mfu(
      row["flops_per_step"], row["timing"]["median_s"], peaks["float32"]["flop_per_s"]
    )
    if sheet and dtype == "bfloat16":
      row["mfu_vs_datasheet"] = common.mfu(row["flops_per_step"], row["timing"]["median_s"], sheet)
    print(
      f"  {row['config']:5s} B={row['batch']:<4d} MFU {row['mfu']:.1%} of the measured "
      f"{dtype} matmul"
      + (f", {row['mfu_vs_datasheet']:.1%} of the datasheet" if "mfu_vs_datasheet" in row else ""),
      flush=True,
    )
  payload = {
    "flop_formula": FLOP_FORMULA,
    "optimizer": "adam(1e-4, b1=0.9, b2=0.98, eps=1e-9)",
    "label_smoothing": 0.1,
    "compute_dtype": dtype,
    "mfu_peak_dtype": dtype,
    "datasheet_peak_flop_per_s": sheet,
    "matmul_peaks": peaks,
    "matmul_peaks_before_after": [peaks_before, peaks_after],
    "results": rows,
  }
  if args.breakdown:
    name, batch_size, length = preset["breakdown"]
    config = CONFIGS[name](**variant)
    payload["breakdown"] = {
      "config": name,
      "batch": batch_size,
      "length": length,
      **breakdown(config, random_batch(config.vocab_size, batch_size, length, length), args.runs),
    }
  common.write_and_plot("train_mfu", args.preset, payload, args.out)


if __name__ == "__main__":
  sys.exit(main())
