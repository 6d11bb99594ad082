"""A decoder-only (GPT-style) language model on the German side of Multi30k, CPU-sized.

Pre-LN and GELU as GPT-2 uses them; windows of 64 tokens of running text.
"""

from transformer.config import get_config as base_config


def get_config():
  config = base_config()
  config.task = "lm"
  config.model.update(
    d_model=256,
    num_heads=4,
    d_ff=1024,
    num_encoder_layers=0,
    num_decoder_layers=4,
    dropout_rate=0.1,
    max_len=64,
    norm="pre",
    activation="gelu",
  )
  config.data.update(vocab_size=8000, max_len=64, tokens_per_batch=4096, eval_batch_size=64)
  config.optimizer.update(
    name="adamw",
    schedule="cosine",
    peak_learning_rate=1e-3,
    warmup_steps=200,
    weight_decay=0.01,
    grad_clip_norm=1.0,
  )
  config.label_smoothing = 0.0
  config.num_train_steps = 2000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
