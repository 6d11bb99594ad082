"""Layer level: one multi-head self-attention layer against one LSTM and one GRU layer of width D.

Two attention layers: bidirectional ("xla", "blockwise"; every position sees every other, as in
the encoder) and causal ("blockwise_causal": each position sees its past only, as in the decoder
and in a language model, and as in the LSTM, which reads left to right). The causal layer runs
the blockwise schedule that skips the tiles above the diagonal, so it computes half the scores.

On a GPU the suite adds cuDNN on both sides: "cudnn" and "cudnn_causal" (flash attention through
`jax.nn.dot_product_attention`, bfloat16, the Transformer's GPU setting) and "lstm_cudnn" (cuDNN's
fused LSTM through `jax.experimental.rnn`, float32 with TF32 matmuls, as PyTorch's default
nn.LSTM on the GPU), the strongest recurrent baseline there; GPU runs use their own sizes
(`PRESETS_GPU`: larger batches and lengths, the LSTM's own scan only up to where it takes seconds).

For each layer, batch size B and sequence length T it measures forward and forward+backward
throughput (tokens/s = B T / median seconds per call), XLA's memory estimate, compile time, and
the number of steps on the sequential critical path:

  attention "xla"        1            (one [T, T] score matrix per head)
  attention "blockwise"  ceil(T / K)  (a scan over key blocks of K = 256; the backward scans again)
  attention "cudnn"      ceil(T / K)  (the flash kernel walks the key blocks inside one launch)
  "blockwise_causal"     ceil(T / K)  (query block i folds in key blocks 0..i; blocks are
                                       independent of each other, the chain is at most T / K long)
  LSTM, GRU              T            (h_t needs h_{t-1}; the backward runs T more steps)

FLOPs per forward call (matmuls only, the convention of `train_mfu.py`; backward = 2 x forward):
  attention  B (8 T D^2 + 4 T^2 D)   Q, K, V, output projections + Q K^T and P V (non-causal)
  causal     B (8 T D^2 + 2 T^2 D)   the lower half of Q K^T and P V (the diagonal tiles' upper
                                     halves, T K D more, are computed and not counted)
  LSTM       B T 16 D^2              [x_t ; h_{t-1}] (2D) x 4 gates (D each), multiply-add = 2
  GRU        B T 12 D^2              the same with 3 gates

Per token, attention costs 8 D^2 + 4 T D FLOPs and the LSTM 16 D^2: they are equal at T = 2 D
(1024 for D = 512; T = D against the GRU), so past that length attention can only stay ahead if
the recurrence runs at a much lower FLOP rate than attention's large matmuls.

Single measurements on a shared VM drift by 10-20% within minutes, more than the margins near a
crossover. At the acceptance length (T = 2048, B = 1) a head-to-head therefore times the LSTM,
bidirectional and causal layers in turns, one call each per round, and reports the per-round
speed-up over the LSTM (median, range, rounds won).

The crossover of an attention implementation with the LSTM is where, as T grows, attention's
forward+backward tokens/s falls below the LSTM's; it is interpolated linearly in log T between
the two measured lengths that bracket the sign change. "lstm_autodiff" is the same LSTM
differentiated by JAX's own scan transpose (weight gradients accumulated inside the loop) instead
of the cuDNN-style backward of `transformer.model.rnn.recurrence`; it shows how much of the
comparison depends on the recurrent baseline's implementation.

  python -m benchmarks.attention_vs_rnn [--preset quick|full]
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from transformer import MultiHeadAttention, TransformerConfig
from transformer.model.rnn import GRU, LSTM, CudnnLSTM

D_MODEL, NUM_HEADS = 512, 8
BLOCK = TransformerConfig.attention_block_size  # the library default
LSTMS = ("lstm", "lstm_autodiff", "lstm_cudnn")
PRESETS = {
    # sweeps: batch -> lengths (every layer); long_lengths: B = 1, blockwise and LSTM only,
    # forward+backward only (an 8k-token call takes ~6 s here); autodiff_up_to: the slow
    # scan-autodiff LSTM stops there.
    "quick": dict(sweeps={4: (16, 64, 256)}, long_lengths=(), autodiff_up_to=256,
                  max_score_bytes=2 ** 28, block_sizes=(32, 128), block_sweep_length=256,
                  head_to_head=dict(length=256, rounds=5)),
    "full": dict(sweeps={1: (16, 64, 256, 512, 1024, 2048, 4096), 8: (16, 64, 256, 512)},
                 long_lengths=(8192,), autodiff_up_to=2048, max_score_bytes=2 ** 31,
                 block_sizes=(64, 128, 256, 512), block_sweep_length=2048,
                 head_to_head=dict(length=2048, rounds=15)),
}
# min_total_s: the timed calls of one measurement add up to at least this (calls take ms here).
PRESETS_GPU = {
    "quick": dict(sweeps={4: (64, 256)}, long_lengths=(), autodiff_up_to=256, scan_up_to=256,
                  max_score_bytes=2 ** 30, block_sizes=(128,), block_sweep_length=256,
                  head_to_head=dict(length=256, rounds=5), min_total_s=0.2),
    "full": dict(sweeps={1: (64, 1024, 4096), 16: (1024,)},
                 long_lengths=(16384,), autodiff_up_to=1024, scan_up_to=4096,
                 max_score_bytes=2 ** 33, block_sizes=(128,), block_sweep_length=4096,
                 head_to_head=dict(length=2048, rounds=10), min_total_s=0.2),
}


CAUSAL = ("blockwise_causal", "cudnn_causal")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def attention_layers() -> list[str]:
  return ["xla", "blockwise", "blockwise_causal"] + (["cudnn", "cudnn_causal"] if on_gpu() else [])


def rnn_layers() -> list[str]:
  return ["lstm", "gru", "lstm_autodiff"] + (["lstm_cudnn"] if on_gpu() else [])


def baselines() -> list[str]:
  """The recurrent layers every attention layer is compared with, the strongest last."""
  return ["lstm_autodiff", "lstm"] + (["lstm_cudnn"] if on_gpu() else [])


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
  config = TransformerConfig.small(attention=name.removesuffix("_causal"),
                                   attention_block_size=block_size,
                                   dropout_rate=0.0, dtype=dtype)
  return MultiHeadAttention(config, rngs=rngs)


def forward_flops(name: str, batch: int, length: int) -> float:
  d = D_MODEL
  if name in LSTMS:
    return batch * length * 16 * d * d
  if name == "gru":
    return batch * length * 12 * d * d
  score_flops = (2 if name in CAUSAL else 4) * length * length * d
  return batch * (8 * length * d * d + score_flops)


def sequential_steps(name: str, length: int, block_size: int = BLOCK) -> int:
  if name in (*LSTMS, "gru"):
    return length
  if name.startswith(("blockwise", "cudnn")):
    return math.ceil(length / min(block_size, length))
  return 1


def output_dtype(apply, params, x_BTD) -> jnp.dtype:
  """The layer's output dtype (bfloat16 for the cuDNN attention layers): the cotangent's."""
  return jax.eval_shape(apply, params, x_BTD).dtype


def measure(name: str, batch: int, length: int, runs: int, with_forward: bool = True,
            block_size: int = BLOCK, min_total_s: float = 1.0) -> dict:
  """Forward and forward+backward (gradients of parameters and input) of one layer."""
  graphdef, params, rest = nnx.split(build_layer(name, block_size), nnx.Param, ...)
  options = {"is_causal": True} if name in CAUSAL else {}
  apply = lambda params, x_BTD: nnx.merge(graphdef, params, rest)(x_BTD, **options)

  def forward_backward(params, x_BTD, dy_BTD):
    _, vjp = jax.vjp(apply, params, x_BTD)
    return vjp(dy_BTD)

  x_BTD = jax.random.normal(jax.random.key(1), (batch, length, D_MODEL), jnp.float32)
  dy_BTD = jax.random.normal(jax.random.key(2), (batch, length, D_MODEL),
                             output_dtype(apply, params, x_BTD))
  tokens, flops = batch * length, forward_flops(name, batch, length)
  steps = sequential_steps(name, length, block_size)
  record = {"layer": name, "batch": batch, "length": length,
            "sequential_steps_forward": steps, "sequential_steps_forward_backward": 2 * steps}
  if name.startswith("blockwise"):
    record["block_size"] = block_size
  modes = [("forward", apply, (params, x_BTD), flops)] if with_forward else []
  modes.append(("forward_backward", forward_backward, (params, x_BTD, dy_BTD), 3 * flops))
  for mode, fn, args, mode_flops in modes:
    timing, compiled = common.time_jitted(fn, *args, runs=runs, min_total_s=min_total_s)
    record[mode] = {"tokens_per_s": tokens / timing.median_s, "flops": mode_flops,
                    "flop_per_s": mode_flops / timing.median_s,
                    "memory": common.compiled_memory(compiled), "timing": timing.as_dict()}
  forward = (f"fwd {common.human(record['forward']['tokens_per_s'])}tok/s  " if with_forward
             else "")
  print(f"  {name:13s} B={batch:<3d} T={length:<6d} {forward}fwd+bwd "
        f"{common.human(record['forward_backward']['tokens_per_s'])}tok/s  "
        f"compile {record['forward_backward']['timing']['compile_s']:.1f}s", flush=True)
  return record


def head_to_head(length: int, rounds: int, layers: tuple[str, ...]) -> dict:
  """Paired timing at one length, B = 1: the layers' compiled forward+backward calls take turns,
  one call each per round, so a slow phase of a shared machine hits all of them alike. Reports
  each attention layer's per-round speed-up over the first layer, the recurrent baseline
  (median, min, max, rounds won)."""
  calls = {}
  for name in layers:
    graphdef, params, rest = nnx.split(build_layer(name), nnx.Param, ...)
    options = {"is_causal": True} if name in CAUSAL else {}

    def forward_backward(params, x_BTD, dy_BTD, graphdef=graphdef, rest=rest, options=options):
      _, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x, **options), params, x_BTD)
      return vjp(dy_BTD)

    x_BTD = jax.random.normal(jax.random.key(1), (1, length, D_MODEL), jnp.float32)
    dtype = output_dtype(lambda p, x: nnx.merge(graphdef, p, rest)(x, **options), params, x_BTD)
    args = (params, x_BTD, jax.random.normal(jax.random.key(2), (1, length, D_MODEL), dtype))
    compiled, _ = common.compile_jitted(forward_backward, *args)
    jax.block_until_ready(compiled(*args))  # warm-up
    calls[name] = lambda compiled=compiled, args=args: compiled(*args)
  seconds = {name: [] for name in layers}
  for _ in range(rounds):
    for name in layers:
      start = time.perf_counter()
      jax.block_until_ready(calls[name]())
      seconds[name].append(time.perf_counter() - start)
  baseline = layers[0]
  report = {"length": length, "batch": 1, "rounds": rounds, "seconds": seconds,
            "baseline": baseline, "speedup_over_lstm": {}}
  for name in layers[1:]:
    ratios = [lstm / ours for lstm, ours in zip(seconds[baseline], seconds[name])]
    report["speedup_over_lstm"][name] = {
        "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
        "rounds_won": sum(r > 1 for r in ratios)}
    print(f"head to head T={length}: {name} / {baseline} fwd+bwd speed-up median "
          f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}), "
          f"won {sum(r > 1 for r in ratios)} of {rounds} rounds", flush=True)
  return report


def crossovers(results: list[dict], layer: str, baseline: str, batch: int) -> list[dict]:
  """Lengths where `layer`'s fwd+bwd tokens/s crosses `baseline`'s (log-linear interpolation)."""
  rate = lambda name: {r["length"]: r["forward_backward"]["tokens_per_s"] for r in results
                       if r["layer"] == name and r["batch"] == batch}
  ours, theirs = rate(layer), rate(baseline)
  lengths = sorted(set(ours) & set(theirs))
  ratio = [math.log(ours[t] / theirs[t]) for t in lengths]
  found = []
  for (t0, r0), (t1, r1) in zip(zip(lengths, ratio), zip(lengths[1:], ratio[1:])):
    if (r0 > 0) != (r1 > 0):
      at = math.exp(math.log(t0) + (math.log(t1) - math.log(t0)) * r0 / (r0 - r1))
      found.append({"layer": layer, "baseline": baseline, "batch": batch, "length": round(at),
                    "between": [t0, t1],
                    "direction": "falls below" if r0 > 0 else "rises above"})
  return found


def acceptance(results: list[dict], batch: int, baseline: str = "lstm", up_to: int = 2048,
               layer: str = "blockwise") -> dict:
  """Does `layer`'s fwd+bwd beat `baseline` at every measured T <= up_to?"""
  rate = lambda name: {r["length"]: r["forward_backward"]["tokens_per_s"] for r in results
                       if r["layer"] == name and r["batch"] == batch}
  blockwise, theirs = rate(layer), rate(baseline)
  lengths = sorted(t for t in set(blockwise) & set(theirs) if t <= up_to)
  losing = [t for t in lengths if blockwise[t] <= theirs[t]]
  return {"layer": layer, "batch": batch, "baseline": baseline, "up_to": up_to,
          "lengths_checked": lengths,
          "lengths_lost": losing, "speedup": {t: blockwise[t] / theirs[t] for t in lengths},
          "reaches_up_to": bool(lengths) and max(lengths) >= up_to,
          "passed": bool(lengths) and not losing}


def summary(results: list[dict], batches: list[int], layers: list[str] | None = None,
            recurrent: list[str] | None = None) -> dict:
  """Crossovers of each attention layer with each recurrent baseline and the acceptance checks,
  from the measurements so far (layers and baselines: this backend's, unless given)."""
  layers, recurrent = layers or attention_layers(), recurrent or baselines()
  return {
      "crossovers": [c for batch in batches for baseline in recurrent for layer in layers
                     for c in crossovers(results, layer, baseline, batch)],
      "acceptance_blockwise_beats_lstm": [
          acceptance(results, batch, baseline, layer=layer)
          for layer in layers if layer != "xla" for baseline in recurrent for batch in batches]}


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  preset = {**(PRESETS_GPU if on_gpu() else PRESETS)[args.preset]}
  min_total_s = preset.get("min_total_s", 1.0)
  scan_up_to = preset.get("scan_up_to", math.inf)  # the scan LSTM/GRU; cuDNN's LSTM always runs
  long_layers = ("blockwise", "blockwise_causal", "cudnn", "cudnn_causal", "lstm", "lstm_cudnn")
  batches = list(preset["sweeps"])
  record = {"d_model": D_MODEL, "num_heads": NUM_HEADS, "block_size": BLOCK,
            "causal_layers": CAUSAL,
            "dtype": "float32 (cudnn attention layers: bfloat16; lstm_cudnn: float32 with TF32)",
            "flop_parity_length": {"lstm": 2 * D_MODEL, "gru": D_MODEL}, "complete": False,
            "results": []}

  def save(done: str):
    # Written after every step, so a run stopped by a time limit keeps what it measured.
    record.update(summary(record["results"], batches), done=done)
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
        record["results"].append(measure(name, batch, length, args.runs, with_forward=not long,
                                         min_total_s=min_total_s))
        save(f"sweep to {name}, B={batch}, T={length}")
  # On a GPU the scan LSTM joins the round too, to show what cuDNN's LSTM gains over it.
  record["head_to_head"] = head_to_head(**preset["head_to_head"], layers=(
      baselines()[-1], *(["lstm"] if on_gpu() else []),
      *(n for n in attention_layers() if n != "xla")))
  save("sweep and head-to-head")
  # Block size of the blockwise scan at one length: fewer, larger blocks against more, smaller.
  record["block_size_sweep"] = [
      measure(name, 1, preset["block_sweep_length"], args.runs, with_forward=False,
              block_size=k, min_total_s=min_total_s)
      for name in ("blockwise", "blockwise_causal") for k in preset["block_sizes"]]
  record["complete"] = True
  for line in record["crossovers"]:
    print(f"crossover: {line['layer']} {line['direction']} {line['baseline']} at "
          f"T~{line['length']} (B={line['batch']}, between {line['between']})")
  for check in record["acceptance_blockwise_beats_lstm"]:
    print(f"{check['layer']} beats {check['baseline']} fwd+bwd at every measured T<=2048 "
          f"(B={check['batch']}, up to T={max(check['lengths_checked'], default=0)}): "
          f"{check['passed']}  lost at {check['lengths_lost']}")
  path = save("everything")
  print(f"wrote {path}")
  from benchmarks import plot
  plot.plot_attention_vs_rnn(path)


if __name__ == "__main__":
  sys.exit(main())
