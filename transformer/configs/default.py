"""The CPU recipe: English->German on the shipped Multi30k in minutes on two cores.

A narrow base-style model (post-LN, sinusoidal positions, tied embeddings, Adam with the paper's
warm-up schedule, label smoothing 0.1), sized so a 2-core CPU trains it in about ten minutes.
"""

from transformer.train.config import get_config as base_config


def get_config():
  config = base_config()
  config.model.update(
    d_model=192,
    num_heads=4,
    d_ff=768,
    num_encoder_layers=3,
    num_decoder_layers=3,
    dropout_rate=0.1,
    max_len=64,
  )
  config.data.update(
    vocab_size=6000,
    max_len=64,
    tokens_per_batch=2048,
    length_buckets=(16, 24, 32, 64),
    eval_batch_size=128,
  )
  config.optimizer.update(warmup_steps=200, lr_scale=0.4)
  config.num_train_steps = 900
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300
  config.average_last_checkpoints = 0
  config.decode.update(beam_size=4, alpha=0.6)
  return config
