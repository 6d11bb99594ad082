"""Layer level: one multi-head self-attention layer against one LSTM and one GRU layer of width D.

Bidirectional ("xla", "blockwise"; on a GPU "cudnn") and causal ("blockwise_causal"; on a GPU
"cudnn_causal") attention against the LSTM, the GRU (on a GPU also cuDNN's LSTM): forward and
forward+backward tokens/s per batch size and length, memory, compile time, sequential steps,
crossover lengths, and a paired head-to-head at T = 2048. What is counted and how each layer runs:
benchmarks/README.md, "attention_vs_rnn: method".

  python -m benchmarks.attention_vs_rnn [--preset quick|full]
  python -m benchmarks.attention_vs_rnn --head_to_head   # only the paired run, its own JSON
  python -m benchmarks.attention_vs_rnn --block_sweep    # only the key-block-size sweep
  python -m benchmarks.attention_vs_rnn --resummarize results/attention_vs_rnn_*.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from transformer import MultiHeadAttention, TransformerConfig
from transformer.baselines.rnn import GRU, LSTM, CudnnLSTM

D_MODEL, NUM_HEADS = 512, 8
BLOCK = TransformerConfig.attention_block_size  # the library default
ATTENTION = ("xla", "blockwise", "blockwise_causal", "cudnn", "cudnn_causal")
LSTMS = ("lstm", "lstm_autodiff", "lstm_cudnn")
RECURRENT = ("lstm", "gru", "lstm_autodiff", "lstm_cudnn")
CAUSAL = ("blockwise_causal", "cudnn_causal")
ACCEPTANCE_LENGTH = 2048
PRESETS = {
  # sweeps: batch -> lengths (every layer); long_lengths: B = 1, blockwise and LSTM only,
  # forward+backward only (an 8k-token call takes ~6 s here); autodiff_up_to: the slow
  # scan-autodiff LSTM stops there.
  "quick": {
    "sweeps": {4: (16, 64, 256)},
    "long_lengths": (),
    "autodiff_up_to": 256,
    "max_score_bytes": 2**28,
    "block_sizes": (32, 128),
    "block_sweep_length": 256,
    "head_to_head": {"length": 256, "rounds": 5},
  },
  "full": {
    "sweeps": {1: (16, 64, 256, 512, 1024, 2048, 4096), 8: (64, 256, 512)},
    "long_lengths": (8192,),
    "autodiff_up_to": 2048,
    "max_score_bytes": 2**31,
    "block_sizes": (64, 128, 256, 512),
    "block_sweep_length": 2048,
    "head_to_head": {"length": 2048, "rounds": 15},
    "min_total_s": 0.25,
  },
}
# min_total_s: the timed calls of one measurement add up to at least this (default 1 s). The
# full sweeps take 0.25 s (>= 5 calls, and >= 40 of the millisecond calls at short lengths): the
# ~100 short measurements would otherwise add ~75 s, and the whole suite must stay under 15 min.
PRESETS_GPU = {
  "quick": {
    "sweeps": {4: (64, 256)},
    "long_lengths": (),
    "autodiff_up_to": 256,
    "scan_up_to": 256,
    "max_score_bytes": 2**30,
    "block_sizes": (128,),
    "block_sweep_length": 256,
    "head_to_head": {"length": 256, "rounds": 5},
    "min_total_s": 0.2,
  },
  "full": {
    "sweeps": {1: (64, 1024, 4096), 16: (1024,)},
    "long_lengths": (16384,),
    "autodiff_up_to": 1024,
    "scan_up_to": 4096,
    "max_score_bytes": 2**33,
    "block_sizes": (128,),
    "block_sweep_length": 4096,
    "head_to_head": {"length": 2048, "rounds": 10},
    "min_total_s": 0.2,
  },
}


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def attention_layers() -> list[str]:
  return ["xla", "blockwise", "blockwise_causal"] + (["cudnn", "cudnn_causal"] if on_gpu() else [])


def rnn_layers() -> list[str]:
  return ["lstm", "gru", "lstm_autodiff"] + (["lstm_cudnn"] if on_gpu() else [])


def head_to_head_layers() -> tuple[str, ...]:
  """The paired round: the LSTM first (the acceptance check's baseline; on a GPU cuDNN's, then
  the scan LSTM to show what cuDNN gains or loses over it), the GRU, every attention layer that
  reaches long sequences."""
  lstms = ("lstm_cudnn", "lstm") if on_gpu() else ("lstm",)
  return (*lstms, "gru", *(n for n in attention_layers() if n != "xla"))


def record_header() -> dict:
  """What every attention_vs_rnn record states about its layers."""
  return {
    "d_model": D_MODEL,
    "num_heads": NUM_HEADS,
    "block_size": BLOCK,
    "causal_layers": CAUSAL,
    "dtype": "float32 (cudnn attention layers: bfloat16; lstm_cudnn: float32 with TF32)",
    "flop_parity_length": {"lstm": 2 * D_MODEL, "gru": D_MODEL},
  }


def build_layer(name: str, block_size: int = BLOCK) -> nnx.Module:
  rngs = nnx.Rngs(0)
  if name == "lstm_cudnn":
    return CudnnLSTM(D_MODEL, D_MODEL, rngs=rngs)
  if name in ("lstm", "lstm_autodiff"):
    return LSTM(D_MODEL, D_MODEL, rngs=rngs, weight_grads_in_loop=name == "lstm_autodiff")
  if name == "gru":
    return GRU(D_MODEL, D_MODEL, rngs=rngs)
  # cuDNN's fused kernel needs 16-bit inputs; the other layers run in float32.
  dtype = "bfloat16" if name.startswith("cudnn") else "float32"
  config = TransformerConfig.small(
    attention=name.removesuffix("_causal"),
    attention_block_size=block_size,
    dropout_rate=0.0,
    dtype=dtype,
  )
  return MultiHeadAttention(config, rngs=rngs)


def forward_flops(name: str, batch: int, length: int) -> float:
  d = D_MODEL
  if name in LSTMS:
    return batch * length * 16 * d * d
  if name == "gru":
    return batch * length * 12 * d * d
  score_flops = (2 if name in CAUSAL else 4) * length * length * d
  return batch * (8 * length * d * d + score_flops)


def sequential_steps(name: str, length: int, block_size: int = BLOCK) -> int | None:
  """Steps on the forward's dependency chain; None for cuDNN's attention, whose kernel picks its
  own tile size (the library's K says nothing about it)."""
  if name in RECURRENT:
    return length
  if name.startswith("cudnn"):
    return None
  if name.startswith("blockwise"):
    return math.ceil(length / min(block_size, length))
  return 1


def output_dtype(apply, params, x_BTD) -> jnp.dtype:
  """The layer's output dtype (bfloat16 for the cuDNN attention layers): the cotangent's."""
  return jax.eval_shape(apply, params, x_BTD).dtype


def measure(
  name: str,
  batch: int,
  length: int,
  runs: int,
  with_forward: bool = True,
  block_size: int = BLOCK,
  min_total_s: float = 1.0,
) -> dict:
  """Forward and forward+backward (gradients of parameters and input) of one layer."""
  graphdef, params, rest = nnx.split(build_layer(name, block_size), nnx.Param, ...)
  options = {"is_causal": True} if name in CAUSAL else {}
  apply = lambda params, x_BTD: nnx.merge(graphdef, params, rest)(x_BTD, **options)

  def forward_backward(params, x_BTD, dy_BTD):
    _, vjp = jax.vjp(apply, params, x_BTD)
    return vjp(dy_BTD)

  x_BTD = jax.random.normal(jax.random.key(1), (batch, length, D_MODEL), jnp.float32)
  dy_BTD = jax.random.normal(
    jax.random.key(2), (batch, length, D_MODEL), output_dtype(apply, params, x_BTD)
  )
  tokens, flops = batch * length, forward_flops(name, batch, length)
  steps = sequential_steps(name, length, block_size)
  record = {
    "layer": name,
    "batch": batch,
    "length": length,
    "sequential_steps_forward": steps,
    "sequential_steps_forward_backward": None if steps is None else 2 * steps,
  }
  if name.startswith("blockwise"):
    record["block_size"] = block_size
  modes = [("forward", apply, (params, x_BTD), flops)] if with_forward else []
  modes.append(("forward_backward", forward_backward, (params, x_BTD, dy_BTD), 3 * flops))
  for mode, fn, args, mode_flops in modes:
    timing, compiled = common.time_jitted(fn, *args, runs=runs, min_total_s=min_total_s)
    record[mode] = {
      "tokens_per_s": tokens / timing.median_s,
      "flops": mode_flops,
      "flop_per_s": mode_flops / timing.median_s,
      "memory": common.compiled_memory(compiled),
      "timing": timing.as_dict(),
    }
  forward = f"fwd {common.human(record['forward']['tokens_per_s'])}tok/s  " if with_forward else ""
  print(
    f"  {name:13s} B={batch:<3d} T={length:<6d} {forward}fwd+bwd "
    f"{common.human(record['forward_backward']['tokens_per_s'])}tok/s  "
    f"compile {record['forward_backward']['timing']['compile_s']:.1f}s",
    flush=True,
  )
  return record


def _paired_call(name: str, length: int):
  """The compiled forward+backward of one layer at B = 1, warmed up, as a no-argument call."""
  graphdef, params, rest = nnx.split(build_layer(name), nnx.Param, ...)
  options = {"is_causal": True} if name in CAUSAL else {}
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x, **options)

  def forward_backward(params, x_BTD, dy_BTD):
    _, vjp = jax.vjp(apply, params, x_BTD)
    return vjp(dy_BTD)

  x_BTD = jax.random.normal(jax.random.key(1), (1, length, D_MODEL), jnp.float32)
  dy_BTD = jax.random.normal(
    jax.random.key(2), (1, length, D_MODEL), output_dtype(apply, params, x_BTD)
  )
  compiled, _ = common.compile_jitted(forward_backward, params, x_BTD, dy_BTD)
  jax.block_until_ready(compiled(params, x_BTD, dy_BTD))  # warm-up
  return lambda: compiled(params, x_BTD, dy_BTD)


def _ratios(seconds_over: list[float], seconds_ours: list[float]) -> dict:
  ratios = [theirs / ours for theirs, ours in zip(seconds_over, seconds_ours)]
  return {
    "median": statistics.median(ratios),
    "min": min(ratios),
    "max": max(ratios),
    "rounds_won": sum(r > 1 for r in ratios),
  }


def head_to_head(length: int, rounds: int, layers: tuple[str, ...]) -> dict:
  """Paired timing at one length, B = 1: the layers' compiled forward+backward calls take turns,
  one call each per round, so a slow phase of a shared machine hits all of them alike. Reports
  every other layer's per-round speed-up over the first layer (`speedup_over_lstm`) and, where
  the GRU takes part, each attention layer's over the GRU (median, min, max, rounds won)."""
  calls = {name: _paired_call(name, length) for name in layers}
  seconds = common.time_in_turns(calls, rounds)
  baseline = layers[0]
  report = {
    "length": length,
    "batch": 1,
    "rounds": rounds,
    "seconds": seconds,
    "baseline": baseline,
    "speedup_over_lstm": {n: _ratios(seconds[baseline], seconds[n]) for n in layers[1:]},
  }
  if "gru" in layers:
    report["speedup_over_gru"] = {
      n: _ratios(seconds["gru"], seconds[n]) for n in layers if n in ATTENTION
    }
  for field, reference in (("speedup_over_lstm", baseline), ("speedup_over_gru", "gru")):
    for name, s in report.get(field, {}).items():
      print(
        f"head to head T={length}: {name} / {reference} fwd+bwd speed-up median "
        f"{s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f}), "
        f"won {s['rounds_won']} of {rounds} rounds",
        flush=True,
      )
  return report


# ---------------------------------------------------------------------------------------------
# Summary: derived from the measured rows only, so it can be recomputed for any record
# ---------------------------------------------------------------------------------------------


def rates(results: list[dict], layer: str, batch: int) -> dict[int, float]:
  """Length -> forward+backward tokens/s of one layer at one batch size."""
  return {
    r["length"]: r["forward_backward"]["tokens_per_s"]
    for r in results
    if r["layer"] == layer and r["batch"] == batch
  }


def measured(results: list[dict], names: tuple[str, ...]) -> list[str]:
  """The layers of `names` that `results` holds, in the order of `names`."""
  present = {r["layer"] for r in results}
  return [n for n in names if n in present]


def strongest_recurrent(results: list[dict], batch: int) -> dict[int, tuple[str, float]]:
  """Length -> (name, tokens/s) of the fastest recurrent layer measured at that length."""
  best = {}
  for name in measured(results, RECURRENT):
    for length, rate in rates(results, name, batch).items():
      if length not in best or rate > best[length][1]:
        best[length] = (name, rate)
  return dict(sorted(best.items()))


def crossing_points(ours: dict[int, float], theirs: dict[int, float]) -> list[tuple]:
  """(length, t0, t1, direction) where log(ours / theirs) changes sign between two measured
  lengths t0 < t1; the length is interpolated linearly in log T."""
  lengths = sorted(set(ours) & set(theirs))
  ratio = [math.log(ours[t] / theirs[t]) for t in lengths]
  found = []
  for (t0, r0), (t1, r1) in zip(zip(lengths, ratio), zip(lengths[1:], ratio[1:])):
    if (r0 > 0) != (r1 > 0):
      at = math.exp(math.log(t0) + (math.log(t1) - math.log(t0)) * r0 / (r0 - r1))
      found.append((round(at), t0, t1, "falls below" if r0 > 0 else "rises above"))
  return found


def crossovers(results: list[dict], layer: str, baseline: str, batch: int) -> list[dict]:
  """Lengths where `layer`'s fwd+bwd tokens/s crosses `baseline`'s."""
  return [
    {
      "layer": layer,
      "baseline": baseline,
      "batch": batch,
      "length": at,
      "between": [t0, t1],
      "direction": direction,
    }
    for at, t0, t1, direction in crossing_points(
      rates(results, layer, batch), rates(results, baseline, batch)
    )
  ]


def crossovers_vs_strongest(results: list[dict], layer: str, batch: int) -> list[dict]:
  """Lengths where `layer` crosses the fastest recurrent layer measured at each length;
  `strongest_at` names that layer at both bracketing lengths."""
  best = strongest_recurrent(results, batch)
  return [
    {
      "layer": layer,
      "baseline": "strongest recurrent",
      "batch": batch,
      "length": at,
      "between": [t0, t1],
      "strongest_at": [best[t0][0], best[t1][0]],
      "direction": direction,
    }
    for at, t0, t1, direction in crossing_points(
      rates(results, layer, batch), {t: rate for t, (_, rate) in best.items()}
    )
  ]


def acceptance(
  results: list[dict],
  batch: int,
  baseline: str = "lstm",
  up_to: int = ACCEPTANCE_LENGTH,
  layer: str = "blockwise",
) -> dict:
  """Does `layer`'s fwd+bwd beat `baseline` at every measured T <= up_to, with the measurements
  reaching up_to? Where up_to itself was not measured, the first length beyond it must be won
  too (a win on both sides of it); a sweep that stops short of up_to does not pass."""
  ours, theirs = rates(results, layer, batch), rates(results, baseline, batch)
  common_lengths = sorted(set(ours) & set(theirs))
  beyond = [t for t in common_lengths if t >= up_to][:1]
  lengths = [t for t in common_lengths if t < up_to] + beyond
  losing = [t for t in lengths if ours[t] <= theirs[t]]
  passed = bool(beyond) and not losing
  if passed:
    verdict = "passed" + (
      "" if beyond[0] == up_to else f" (T={up_to} not measured; won below it and at T={beyond[0]})"
    )
  elif not beyond:
    verdict = (
      f"not measured up to T={up_to}: the common lengths end at "
      f"T={max(common_lengths, default=None)}" + (f"; lost at T={losing}" if losing else "")
    )
  elif losing == beyond and beyond[0] > up_to:
    verdict = f"undecided: T={up_to} not measured, won below it, lost at T={beyond[0]}"
  else:
    verdict = f"lost at T={losing}"
  return {
    "layer": layer,
    "batch": batch,
    "baseline": baseline,
    "up_to": up_to,
    "lengths_checked": lengths,
    "lengths_lost": losing,
    "speedup": {t: ours[t] / theirs[t] for t in lengths},
    "reaches_up_to": bool(beyond),
    "passed": passed,
    "verdict": verdict,
  }


def summary(results: list[dict]) -> dict:
  """Every derived field of a record, from its measured rows: the fastest recurrent layer per
  length, crossovers of each attention layer with each recurrent layer measured and with the
  fastest one, and the acceptance checks against the LSTM layers and against the GRU."""
  batches = sorted({r["batch"] for r in results})
  attention, recurrent = measured(results, ATTENTION), measured(results, RECURRENT)
  blockwise = [layer for layer in attention if layer != "xla"]
  checks = lambda baselines: [
    acceptance(results, batch, baseline, layer=layer)
    for layer in blockwise
    for baseline in baselines
    for batch in batches
  ]
  return {
    "strongest_recurrent": [
      {"batch": batch, "length": length, "layer": name, "tokens_per_s": rate}
      for batch in batches
      for length, (name, rate) in strongest_recurrent(results, batch).items()
    ],
    "crossovers": [
      c
      for batch in batches
      for baseline in recurrent
      for layer in attention
      for c in crossovers(results, layer, baseline, batch)
    ],
    "crossovers_vs_strongest": [
      c
      for batch in batches
      for layer in attention
      for c in crossovers_vs_strongest(results, layer, batch)
    ],
    "acceptance_blockwise_beats_lstm": checks([b for b in recurrent if b in LSTMS]),
    "acceptance_blockwise_beats_gru": checks([b for b in recurrent if b == "gru"]),
  }


def resummarize(path: Path) -> Path:
  """Recomputes the derived fields of an existing attention_vs_rnn JSON from its measured rows
  (which stay as they are) and redraws its plot."""
  record = json.loads(Path(path).read_text(encoding="utf-8"))
  record.update(summary(record["results"]))
  Path(path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
  print(f"rewrote the summary of {path}")
  from benchmarks import plot

  plot.plot_attention_vs_rnn(path)
  return Path(path)


def print_summary(record: dict) -> None:
  for line in record["crossovers_vs_strongest"]:
    print(
      f"crossover: {line['layer']} {line['direction']} the strongest recurrent layer "
      f"({'/'.join(dict.fromkeys(line['strongest_at']))}) at T~{line['length']} "
      f"(B={line['batch']}, between {line['between']})"
    )
  for check in (
    *record["acceptance_blockwise_beats_lstm"],
    *record["acceptance_blockwise_beats_gru"],
  ):
    print(
      f"{check['layer']} beats {check['baseline']} fwd+bwd at every T<={check['up_to']} "
      f"(B={check['batch']}): {check['passed']} ({check['verdict']})"
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument(
    "--head_to_head",
    action="store_true",
    help="run only the paired head-to-head of the preset; writes "
    "attention_head_to_head_<device>.json",
  )
  mode.add_argument(
    "--block_sweep",
    action="store_true",
    help="run only the block-size sweep of the blockwise layers at one length; "
    "writes attention_block_size_<device>.json",
  )
  mode.add_argument(
    "--resummarize",
    nargs="+",
    type=Path,
    metavar="JSON",
    help="recompute crossovers and acceptance of existing results from their "
    "measured rows (no measurement) and redraw their plots",
  )
  args = common.parse_args(parser, argv)
  for path in args.resummarize or ():
    if not path.is_file():
      parser.error(f"--resummarize: {path} does not exist; pass an attention_vs_rnn_*.json")
    try:
      benchmark = json.loads(path.read_text(encoding="utf-8")).get("benchmark")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
      benchmark = None
    if benchmark != "attention_vs_rnn":
      parser.error(f"--resummarize: {path} is not an attention_vs_rnn result JSON")
  return args


def block_size_sweep(preset: dict, runs: int) -> list[dict]:
  """The blockwise layers' fwd+bwd at one length for each key block size K: fewer, larger
  blocks against more, smaller ones (B = 1). Not in the default run, to keep the suite short."""
  return [
    measure(
      name,
      1,
      preset["block_sweep_length"],
      runs,
      with_forward=False,
      block_size=k,
      min_total_s=preset.get("min_total_s", 1.0),
    )
    for name in ("blockwise", "blockwise_causal")
    for k in preset["block_sizes"]
  ]


def sweep(args, preset: dict) -> Path:
  min_total_s = preset.get("min_total_s", 1.0)
  scan_up_to = preset.get("scan_up_to", math.inf)  # the scan LSTM/GRU; cuDNN's LSTM always runs
  long_layers = ("blockwise", "blockwise_causal", "cudnn", "cudnn_causal", "lstm", "lstm_cudnn")
  record = {**record_header(), "complete": False, "results": []}

  def save(done: str):
    # Written after every step, so a run stopped by a time limit keeps what it measured.
    record.update(summary(record["results"]), done=done)
    return common.write_json("attention_vs_rnn", args.preset, record, args.out, quiet=True)

  for batch, lengths in preset["sweeps"].items():
    long_lengths = preset["long_lengths"] if batch == 1 else ()
    for length in (*lengths, *long_lengths):
      long = length in long_lengths
      for name in (*attention_layers(), *rnn_layers()):
        if long and name not in long_layers:
          continue
        if name == "lstm_autodiff" and length > preset["autodiff_up_to"]:
          continue
        if name in ("lstm", "gru") and length > scan_up_to and not long:
          continue
        score_bytes = batch * NUM_HEADS * length * length * 4
        if name in ("xla", "cudnn", "cudnn_causal") and score_bytes > preset["max_score_bytes"]:
          continue  # the [B, N, T, T] score matrix alone would not fit our memory budget
        record["results"].append(
          measure(name, batch, length, args.runs, with_forward=not long, min_total_s=min_total_s)
        )
        save(f"sweep to {name}, B={batch}, T={length}")
  record["head_to_head"] = head_to_head(**preset["head_to_head"], layers=head_to_head_layers())
  record["complete"] = True
  print_summary(record)
  return save("everything")


def main(argv=None):
  args = parse_args(argv)
  if args.resummarize:
    for path in args.resummarize:
      print_summary(json.loads(resummarize(path).read_text(encoding="utf-8")))
    return 0
  preset = (PRESETS_GPU if on_gpu() else PRESETS)[args.preset]
  if args.head_to_head:
    result = head_to_head(**preset["head_to_head"], layers=head_to_head_layers())
    common.write_json("attention_head_to_head", args.preset, result, args.out)
    return 0
  if args.block_sweep:
    common.write_json(
      "attention_block_size",
      args.preset,
      {**record_header(), "results": block_size_sweep(preset, args.runs)},
      args.out,
    )
    return 0
  path = sweep(args, preset)
  print(f"wrote {path}")
  from benchmarks import plot

  plot.plot_attention_vs_rnn(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
