"""GPU recipe: the paper's base model on Multi30k English->German, aiming at sacreBLEU >= 38.

Multi30k is small (29k pairs), so the base model over-fits without stronger regularisation:
dropout 0.3 and a shorter warm-up than WMT's 4000 steps, with checkpoint averaging at the end.
"""

from transformer.train.config import get_config as base_config


def get_config():
  config = base_config()
  config.model.update(
    d_model=512,
    num_heads=8,
    d_ff=2048,
    num_encoder_layers=6,
    num_decoder_layers=6,
    dropout_rate=0.3,
    attention_dropout_rate=0.1,
    max_len=128,
    dtype="bfloat16",
    attention="auto",
  )
  config.data.update(vocab_size=10_000, max_len=128, tokens_per_batch=8192, eval_batch_size=256)
  config.optimizer.update(warmup_steps=2000, lr_scale=1.0)
  config.num_train_steps = 20_000
  config.log_every_steps = 200
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 5
  config.average_last_checkpoints = 5
  config.decode.update(beam_size=4, alpha=0.6)
  return config
