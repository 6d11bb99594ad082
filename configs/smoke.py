"""A one-layer model on a slice of Multi30k: seconds per run, for tests and quick checks."""

from transformer.config import get_config as base_config


def get_config():
  config = base_config()
  config.model.update(
    d_model=32,
    num_heads=2,
    d_ff=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    max_len=32,
    dropout_rate=0.1,
  )
  config.data.update(
    train_split="train[:1500]",
    eval_split="validation[:64]",
    test_splits=("test_2016[:24]",),
    vocab_size=500,
    max_len=32,
    length_buckets=(32,),
    tokens_per_batch=512,
    eval_batch_size=32,
  )
  config.optimizer.update(warmup_steps=10, lr_scale=1.0)
  config.update(
    num_train_steps=6,
    log_every_steps=1,
    eval_every_steps=100,
    checkpoint_every_steps=3,
    keep_checkpoints=5,
  )
  config.decode.update(beam_size=2, max_extra_tokens=8, num_examples=2)
  return config
