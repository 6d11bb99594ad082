"""The CPU recipe: English->German on the shipped Multi30k, trained and scored in ~13 minutes on
two cores.

The small Transformer of the Multi30k literature (4+4 layers, d_model 128, 4 heads, d_ff 256; see
`multi30k_gpu`), which a CPU runs at ~4,600 target tokens/s, with what a short run needs instead
of its long schedule: dropout 0.1, a 400-step warm-up to a peak learning rate of 4.4e-3, pairs
packed into rows of 64 tokens (no step computes on padding), the last three checkpoints (100
steps apart) averaged, beam 4 with a length penalty of 1.0. The tuning behind these values is in
docs/tuning.md.
"""

from transformer.train.config import get_config as base_config


def get_config():
  config = base_config()
  config.model.update(
    d_model=128,
    num_heads=4,
    d_ff=256,
    num_encoder_layers=4,
    num_decoder_layers=4,
    dropout_rate=0.1,
    max_len=64,
  )
  config.data.update(
    vocab_size=8000, max_len=64, tokens_per_batch=2048, packing=True, eval_batch_size=256
  )
  # rsqrt schedule: lr = lr_scale / sqrt(d_model) * min(step^-0.5, step * warmup^-1.5)
  config.optimizer.update(warmup_steps=400, lr_scale=1.0)
  config.num_train_steps = 1400
  config.log_every_steps = 100
  config.eval_every_steps = 350
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3
  config.average_last_checkpoints = 3
  config.decode.update(beam_size=4, alpha=1.0)
  return config
