"""Model level: the Transformer encoder-decoder against an LSTM encoder-decoder with additive
attention of (nearly) the same parameter count, train-step throughput on Multi30k-shaped batches.

Both models run the same pure train step as the training loop (`transformer.train.step`): label-
smoothed cross-entropy, Adam, dropout 0.1, state donated. Batches look like Multi30k after
tokenisation: B = 64 sentence pairs padded to S = T = 32, each row's length drawn from [8, 32],
vocabulary 8000. Throughput counts the padded target positions (B T per step) and, apart, the
real target tokens.

The LSTM model (`transformer.model.rnn.LSTMSeq2Seq`: 2-layer bidirectional encoder, 2-layer
decoder, Bahdanau attention, tied embeddings) takes the width D whose parameter count is closest
to the Transformer's. `compiled_step_memory` is XLA's buffer assignment of each compiled step.

  python -m benchmarks.model_level [--preset quick|full]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from benchmarks.train_mfu import build_step, count_params, time_train_step
from transformer import EncoderDecoder, TransformerConfig
from transformer.model.rnn import LSTMSeq2Seq, RNNConfig

PRESETS = {
    "quick": dict(transformer=TransformerConfig.tiny(vocab_size=512, dropout_rate=0.1),
                  batch=8, length=16),
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


def main(argv=None):
  args = common.parse_args(__doc__.splitlines()[0], argv)
  preset = PRESETS[args.preset]
  config = preset["transformer"]
  transformer = EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1))
  rnn_config = RNNConfig.with_num_parameters(count_params(transformer), config.vocab_size,
                                             dropout_rate=config.dropout_rate)
  lstm = LSTMSeq2Seq(rnn_config, rngs=nnx.Rngs(params=0, dropout=1))
  batch_size, length = preset["batch"], preset["length"]
  batch = multi30k_like_batch(config.vocab_size, batch_size, length)
  real_target_tokens = int(jnp.sum(batch["targets"] != 0))
  rows = []
  for name, model, sizes in (("transformer", transformer, vars(config)),
                             ("lstm_attention", lstm, vars(rnn_config))):
    steps, state = build_step(model)
    timing, memory, _ = time_train_step(steps, state, batch, args.runs)
    row = {"model": name, "config": dict(sizes), "parameters": count_params(model),
           "batch": batch_size, "source_length": length, "target_length": length,
           "real_target_tokens_per_batch": real_target_tokens,
           "target_tokens_per_s": batch_size * length / timing.median_s,
           "real_target_tokens_per_s": real_target_tokens / timing.median_s,
           # Forward critical path: each encoder layer scans S, then the decoder scans T.
           "sequential_steps_forward": (1 if name == "transformer" else
                                        (rnn_config.num_encoder_layers + 1) * length),
           "compiled_step_memory": memory, "timing": timing.as_dict()}
    rows.append(row)
    print(f"  {name:15s} {row['parameters'] / 1e6:.2f}M params  step {timing.median_s * 1e3:.0f} ms"
          f"  {common.human(row['target_tokens_per_s'])}tok/s (target)  compile "
          f"{timing.compile_s:.1f}s", flush=True)
  speedup = rows[0]["target_tokens_per_s"] / rows[1]["target_tokens_per_s"]
  print(f"transformer / lstm train-step throughput: {speedup:.2f}x")
  common.write_and_plot("model_level", args.preset, {
      "batch_shape": "Multi30k-like: lengths uniform in [T/4, T], padded to T",
      "transformer_over_lstm": speedup, "results": rows}, args.out)


if __name__ == "__main__":
  sys.exit(main())
