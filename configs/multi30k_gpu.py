"""GPU recipe: the small Transformer of the Multi30k literature, English->German.

Multi30k has 29k training pairs, so a small model regularised hard wins over the paper's base
model: 4+4 layers, d_model 128, 4 heads, d_ff 256, dropout 0.3, a peak learning rate of about
5e-3 and an average of the last 10 checkpoints, as in Wu et al. (2021), "Good for Misconceived
Reasons", who report about 41 lowercased, tokenized BLEU on test_2016 with it. Beam 5, and a
length penalty of 1.0, since a short translation loses BLEU twice (brevity penalty and recall).
The same settings run on a CPU in float32 (`--config.model.dtype=float32`), only slower: on two
cores, 5,800 of its steps take 90 minutes and reach 39.6 sacreBLEU on test_2016 (docs/tuning.md).
"""

from transformer.config import get_config as base_config


def get_config():
  config = base_config()
  config.model.update(
    d_model=128,
    num_heads=4,
    d_ff=256,
    num_encoder_layers=4,
    num_decoder_layers=4,
    dropout_rate=0.3,
    max_len=64,
    dtype="bfloat16",
    attention="auto",
  )
  config.data.update(
    vocab_size=8000, max_len=64, tokens_per_batch=4096, packing=True, eval_batch_size=512
  )
  # rsqrt schedule: lr = lr_scale / sqrt(d_model) * min(step^-0.5, step * warmup^-1.5), which
  # peaks at 2.53 / sqrt(128 * 2000) = 5.0e-3 after the warm-up.
  config.optimizer.update(warmup_steps=2000, lr_scale=2.53)
  config.num_train_steps = 8000
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 10
  config.average_last_checkpoints = 10
  config.decode.update(beam_size=5, alpha=1.0)
  return config
