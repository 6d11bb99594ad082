"""Decoding speed: greedy search with the KV cache against recomputing the prefix, and beam search
(beam 4, with the cache), on the small config with random weights.

Every run generates exactly `max_length` tokens per sentence: the end-of-sentence id passed to
the decoders is -1, which argmax never returns, so no row stops early (random weights would
otherwise stop at arbitrary points). Tokens/s = B x max_length / median seconds per call, the
tokens of the returned translation (beam search computes W = 4 rows per sentence for them).

`greedy_decode` and `beam_search` compile inside their first call; compile_s here is that first
call's time minus the median of the later ones.

`beam_search` has no recompute mode, so only greedy search is measured both ways.

  python -m benchmarks.decode_speed [--preset quick|full]
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from transformer import EncoderDecoder, TransformerConfig
from transformer.decode import beam_search, greedy_decode

NEVER = -1  # an end-of-sentence id no decoder emits: every call decodes max_length steps
PRESETS = {
    "quick": dict(config=TransformerConfig.tiny(), batches=(1, 4), source_length=8,
                  max_length=8),
    "full": dict(config=TransformerConfig.small(), batches=(1, 32), source_length=32,
                 max_length=32),
}


def first_call(call):
  """(output, seconds) of the call that compiles."""
  start = time.perf_counter()
  out = jax.block_until_ready(call())
  return out, time.perf_counter() - start


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  preset = PRESETS[args.preset]
  config, max_length = preset["config"], preset["max_length"]
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  decoders = {
      "greedy_cache": lambda src: greedy_decode(model, src, max_length=max_length, eos_id=NEVER),
      "greedy_recompute": lambda src: greedy_decode(model, src, max_length=max_length,
                                                    use_cache=False, eos_id=NEVER),
      "beam4_cache": lambda src: beam_search(model, src, max_length=max_length, beam_size=4,
                                             eos_id=NEVER)[0],
  }
  rows = []
  for batch in preset["batches"]:
    src_BS = jax.random.randint(jax.random.key(batch), (batch, preset["source_length"]), 4,
                                config.vocab_size, jnp.int32)
    for name, decode in decoders.items():
      out, first_s = first_call(lambda: decode(src_BS))
      assert out.shape[-1] == max_length and not bool(jnp.any(out == config.pad_id)), \
          "a row stopped early: the fixed-length measurement is void"
      timing = common.time_calls(lambda: decode(src_BS), runs=args.runs, warmup=0)
      timing.compile_s = max(first_s - timing.median_s, 0.0)
      row = {"decoder": name, "batch": batch, "source_length": preset["source_length"],
             "max_length": max_length, "tokens_per_s": batch * max_length / timing.median_s,
             "ms_per_step": timing.median_s / max_length * 1e3, "timing": timing.as_dict()}
      rows.append(row)
      print(f"  {name:17s} B={batch:<3d} {common.human(row['tokens_per_s'])}tok/s  "
            f"{row['ms_per_step']:.1f} ms/step  compile ~{timing.compile_s:.1f}s", flush=True)
  rate = {(r["decoder"], r["batch"]): r["tokens_per_s"] for r in rows}
  speedups = {f"B={b}": rate["greedy_cache", b] / rate["greedy_recompute", b]
              for b in preset["batches"]}
  print("KV cache speed-up of greedy decoding:", {k: f"{v:.1f}x" for k, v in speedups.items()})
  common.write_json("decode_speed", args.preset, {
      "model": {k: getattr(config, k) for k in ("vocab_size", "d_model", "num_heads", "d_ff",
                                                "num_encoder_layers", "num_decoder_layers")},
      "weights": "random (seed 0)", "eos_id": NEVER, "cache_speedup_greedy": speedups,
      "results": rows}, args.out)


if __name__ == "__main__":
  sys.exit(main())
