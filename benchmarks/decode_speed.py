"""Decoding speed: greedy search with the KV cache against a full-window recompute (no cache),
and beam search (beam 4, with the cache), on the small config with random weights.

The no-cache baseline is `greedy_decode(..., use_cache=False)`, which runs the decoder over the
whole fixed [B, max_length] window at every step, so the shapes stay static under jit: T steps
of T positions, T^2 decoder positions per sentence (1,024 at T = 32), where recomputing only the
prefix would take T (T + 1) / 2 (528) and the cache T (32). It is labelled
`greedy_full_window_recompute`: the cache's speed-up over it is larger than over a true prefix
recompute would be.

Every run generates exactly `max_length` tokens per sentence: the end-of-sentence id passed to
the decoders is -1, which argmax never returns, so no row stops early (random weights would
otherwise stop at arbitrary points). Tokens/s = B x max_length / median seconds per call, the
tokens of the returned translation (beam search computes W = 4 rows per sentence for them).

Each decoder is timed as one jitted pure function of (model state, source ids): the model is
split into its graph and state once, outside the timed region, so no call pays the host-side
`nnx.split` that the public `greedy_decode(model, ...)` does on each call. It is compiled with
`lower().compile()`, timed apart as compile_s; the call that checks the output is the warm-up.

`beam_search` has no recompute mode, so only greedy search is measured both ways.

  python -m benchmarks.decode_speed [--preset quick|full]
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from transformer import EncoderDecoder, TransformerConfig
from transformer.decode import beam_search, greedy_decode

NEVER = -1  # an end-of-sentence id no decoder emits: every call decodes max_length steps
BEAMS = 4
PRESETS = {
  "quick": dict(config=TransformerConfig.tiny(), batches=(1, 4), source_length=8, max_length=8),
  "full": dict(config=TransformerConfig.small(), batches=(1, 32), source_length=32, max_length=32),
}
DESCRIPTIONS = {
  "greedy_cache": "greedy, KV cache: one new position per step",
  "greedy_full_window_recompute": (
    "greedy, no cache: the decoder runs over the whole [B, max_length] window at every "
    "step (static shapes under jit), max_length^2 positions per sentence, not the "
    "max_length (max_length + 1) / 2 of a prefix-only recompute"
  ),
  "beam4_cache": "beam search, beam 4, KV cache",
}


def decoders(max_length: int) -> dict:
  """name -> (model, src_BS) -> tokens [B, max_length]; each becomes one jitted function."""
  return {
    "greedy_cache": lambda model, src: greedy_decode(
      model, src, max_new_tokens=max_length, eos_id=NEVER
    ),
    "greedy_full_window_recompute": lambda model, src: greedy_decode(
      model, src, max_new_tokens=max_length, use_cache=False, eos_id=NEVER
    ),
    "beam4_cache": lambda model, src: beam_search(
      model, src, max_new_tokens=max_length, beam_size=BEAMS, eos_id=NEVER
    )[0],
  }


def positions_per_sentence(name: str, max_length: int) -> int:
  """Decoder positions computed per sentence: the work the cache saves, in positions."""
  if name == "greedy_full_window_recompute":
    return max_length * max_length
  return max_length * (BEAMS if name.startswith("beam") else 1)


def time_decoder(
  decode, graphdef, state, src_BS, max_length: int, pad_id: int, runs: int
) -> common.Timing:
  """Compiles decode(merged model, src_BS) as a pure function of (state, src_BS), checks that
  every row decodes max_length tokens, then times the compiled call."""

  def pure(state, src_BS):
    return decode(nnx.merge(graphdef, state), src_BS)

  compiled, compile_s = common.compile_jitted(pure, state, src_BS)
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(state, src_BS))  # the warm-up, its output checked
  first_s = time.perf_counter() - start
  if out.shape[-1] != max_length or bool(jnp.any(out == pad_id)):
    raise RuntimeError("a row stopped early: the fixed-length measurement is void")
  timing = common.time_calls(
    lambda: compiled(state, src_BS),
    warmup=0,
    compile_s=compile_s,
    runs=runs - 1 if first_s > common.LONG_CALL_S else runs,
  )
  if first_s > common.LONG_CALL_S:
    # As in time_calls: a warm-up this long has no one-time cost worth excluding; count it.
    times = [first_s, *timing.times_s]
    timing = common.Timing(
      statistics.median(times), min(times), max(times), len(times), compile_s, times
    )
  return timing


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  preset = PRESETS[args.preset]
  config, max_length = preset["config"], preset["max_length"]
  graphdef, state = nnx.split(EncoderDecoder(config, rngs=nnx.Rngs(0)))  # once, off the clock
  rows = []
  for batch in preset["batches"]:
    src_BS = jax.random.randint(
      jax.random.key(batch), (batch, preset["source_length"]), 4, config.vocab_size, jnp.int32
    )
    for name, decode in decoders(max_length).items():
      timing = time_decoder(decode, graphdef, state, src_BS, max_length, config.pad_id, args.runs)
      row = {
        "decoder": name,
        "batch": batch,
        "source_length": preset["source_length"],
        "max_length": max_length,
        "decoder_positions_per_sentence": positions_per_sentence(name, max_length),
        "tokens_per_s": batch * max_length / timing.median_s,
        "ms_per_step": timing.median_s / max_length * 1e3,
        "timing": timing.as_dict(),
      }
      rows.append(row)
      print(
        f"  {name:28s} B={batch:<3d} {common.human(row['tokens_per_s'])}tok/s  "
        f"{row['ms_per_step']:.1f} ms/step  compile {timing.compile_s:.1f}s",
        flush=True,
      )
  rate = {(r["decoder"], r["batch"]): r["tokens_per_s"] for r in rows}
  speedups = {
    f"B={b}": rate["greedy_cache", b] / rate["greedy_full_window_recompute", b]
    for b in preset["batches"]
  }
  print(
    "KV cache speed-up of greedy decoding over the full-window recompute:",
    {k: f"{v:.1f}x" for k, v in speedups.items()},
  )
  common.write_and_plot(
    "decode_speed",
    args.preset,
    {
      "model": {
        k: getattr(config, k)
        for k in (
          "vocab_size",
          "d_model",
          "num_heads",
          "d_ff",
          "num_encoder_layers",
          "num_decoder_layers",
        )
      },
      "weights": "random (seed 0)",
      "eos_id": NEVER,
      "decoders": DESCRIPTIONS,
      "timed": "jitted pure function of (model state, source ids), model split once untimed",
      "cache_speedup_greedy": speedups,
      "results": rows,
    },
    args.out,
  )


if __name__ == "__main__":
  sys.exit(main())
