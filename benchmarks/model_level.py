"""Model level: the Transformer encoder-decoder against an LSTM encoder-decoder with additive
attention of (nearly) the same parameter count, train-step throughput on Multi30k-shaped batches.

Both models run the same pure train step as the training loop (`transformer.train.step`): label-
smoothed cross-entropy, Adam, dropout 0.1, state donated. Batches look like Multi30k after
tokenisation: B = 64 sentence pairs padded to S = T = 32, each row's length drawn from [8, 32],
vocabulary 8000. Throughput counts the padded target positions (B T per step) and, apart, the
real target tokens.

The LSTM model (`transformer.baselines.rnn.LSTMSeq2Seq`: 2-layer bidirectional encoder, 2-layer
decoder, Bahdanau attention, tied embeddings) takes the width D whose parameter count is closest
to the Transformer's. `compiled_step_memory` is XLA's buffer assignment of each compiled step.

The LSTM model's encoder layers use the custom backward of `transformer.baselines.rnn.recurrence`
(weight gradients as one matmul after the loop); its attention decoder's loop, where the context
enters every step's gates, is differentiated by JAX's scan transpose, which accumulates weight
gradients inside the loop. `--lstm_backward` measures what that costs at this benchmark's shape:
one LSTM layer of the baseline's width, forward+backward, with each backward, timed in turns.

  python -m benchmarks.model_level [--preset quick|full] [--lstm_backward]
"""

from __future__ import annotations

import statistics
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from benchmarks.steps import build_step, count_params, time_train_step
from transformer import EncoderDecoder, TransformerConfig
from transformer.baselines.rnn import LSTM, LSTMSeq2Seq, RNNConfig

PRESETS = {
  "quick": dict(
    transformer=TransformerConfig.tiny(vocab_size=512, dropout_rate=0.1), batch=8, length=16
  ),
  "full": dict(transformer=TransformerConfig.small(vocab_size=8000), batch=64, length=32),
}


def multi30k_like_batch(vocab_size: int, batch: int, length: int, seed: int = 0):
  """Rows of random ids with lengths in [length / 4, length], PAD (0) after; ids >= 4."""
  keys = jax.random.split(jax.random.key(seed), 4)
  batch_out = {}
  for name, k_len, k_ids in (("inputs", keys[0], keys[1]), ("targets", keys[2], keys[3])):
    lengths_B = jax.random.randint(k_len, (batch,), length // 4, length + 1)
    ids_BT = jax.random.randint(k_ids, (batch, length), 4, vocab_size, jnp.int32)
    batch_out[name] = jnp.where(jnp.arange(length)[None, :] < lengths_B[:, None], ids_BT, 0)
  return batch_out


def lstm_backward_cost(d_model: int, batch: int, length: int, rounds: int) -> dict:
  """One LSTM layer [batch, length, d_model], forward+backward, with the custom backward and
  with the scan transpose: the two compiled calls take turns, one call each per round, so a slow
  phase of a shared machine hits both alike. Reports each one's median and the per-round ratio."""
  x_BTD = jax.random.normal(jax.random.key(0), (batch, length, d_model), jnp.float32)
  calls, compile_s = {}, {}
  for name, in_loop in (("custom_backward", False), ("scan_transpose", True)):
    graphdef, params = nnx.split(
      LSTM(d_model, d_model, rngs=nnx.Rngs(0), weight_grads_in_loop=in_loop)
    )
    loss = lambda p, x, graphdef=graphdef: jnp.sum(nnx.merge(graphdef, p)(x))
    compiled, compile_s[name] = common.compile_jitted(jax.grad(loss, argnums=(0, 1)), params, x_BTD)
    jax.block_until_ready(compiled(params, x_BTD))  # warm-up
    calls[name] = lambda compiled=compiled, params=params: compiled(params, x_BTD)
  seconds = common.time_in_turns(calls, rounds)
  ratios = [
    slow / fast for slow, fast in zip(seconds["scan_transpose"], seconds["custom_backward"])
  ]
  return {
    "d_model": d_model,
    "batch": batch,
    "length": length,
    "rounds": rounds,
    "median_s": {name: statistics.median(s) for name, s in seconds.items()},
    "compile_s": compile_s,
    "seconds": seconds,
    "scan_transpose_over_custom": {
      "median": statistics.median(ratios),
      "min": min(ratios),
      "max": max(ratios),
    },
  }


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--lstm_backward",
    action="store_true",
    help="only time one LSTM layer's two backward passes at this shape",
  )
  args = common.parse_args(parser, argv)
  preset = PRESETS[args.preset]
  config = preset["transformer"]
  transformer = EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1))
  rnn_config = RNNConfig.with_num_parameters(
    count_params(transformer), config.vocab_size, dropout_rate=config.dropout_rate
  )
  if args.lstm_backward:
    report = lstm_backward_cost(
      rnn_config.d_model, preset["batch"], preset["length"], max(args.runs, 7)
    )
    median = report["median_s"]
    print(
      f"LSTM layer D={rnn_config.d_model} B={preset['batch']} T={preset['length']} fwd+bwd: "
      f"custom backward {median['custom_backward'] * 1e3:.0f} ms, scan transpose "
      f"{median['scan_transpose'] * 1e3:.0f} ms, ratio "
      f"{report['scan_transpose_over_custom']['median']:.2f}x"
    )
    common.write_json("model_level_lstm_backward", args.preset, report, args.out)
    return 0
  lstm = LSTMSeq2Seq(rnn_config, rngs=nnx.Rngs(params=0, dropout=1))
  batch_size, length = preset["batch"], preset["length"]
  batch = multi30k_like_batch(config.vocab_size, batch_size, length)
  real_target_tokens = int(jnp.sum(batch["targets"] != 0))
  rows = []
  for name, model, sizes in (
    ("transformer", transformer, vars(config)),
    ("lstm_attention", lstm, vars(rnn_config)),
  ):
    steps, state = build_step(model)
    timing, memory, _ = time_train_step(steps, state, batch, args.runs)
    row = {
      "model": name,
      "config": dict(sizes),
      "parameters": count_params(model),
      "batch": batch_size,
      "source_length": length,
      "target_length": length,
      "real_target_tokens_per_batch": real_target_tokens,
      "target_tokens_per_s": batch_size * length / timing.median_s,
      "real_target_tokens_per_s": real_target_tokens / timing.median_s,
      # Forward critical path: each encoder layer scans S, then the decoder scans T.
      "sequential_steps_forward": (
        1 if name == "transformer" else (rnn_config.num_encoder_layers + 1) * length
      ),
      "compiled_step_memory": memory,
      "timing": timing.as_dict(),
    }
    rows.append(row)
    print(
      f"  {name:15s} {row['parameters'] / 1e6:.2f}M params  step {timing.median_s * 1e3:.0f} ms"
      f"  {common.human(row['target_tokens_per_s'])}tok/s (target)  compile "
      f"{timing.compile_s:.1f}s",
      flush=True,
    )
  speedup = rows[0]["target_tokens_per_s"] / rows[1]["target_tokens_per_s"]
  print(f"transformer / lstm train-step throughput: {speedup:.2f}x")
  common.write_and_plot(
    "model_level",
    args.preset,
    {
      "batch_shape": "Multi30k-like: lengths uniform in [T/4, T], padded to T",
      "transformer_over_lstm": speedup,
      "results": rows,
    },
    args.out,
  )


if __name__ == "__main__":
  sys.exit(main())
