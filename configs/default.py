"""The CPU recipe: English->German on the shipped Multi30k, trained and scored in ~15 minutes on
two cores.

The GPU recipe's model, the small Transformer of the Multi30k literature (`multi30k_gpu`: 4+4
layers, d_model 128, 4 heads, d_ff 256), which a CPU runs at ~4,700 packed target tokens/s, with
what a short run needs instead of its long schedule: float32, dropout 0.1, half its batch, a
400-step warm-up to a peak learning rate of 3.1e-3, 1,400 steps, the last three checkpoints (100
steps apart) averaged, beam 4. The tuning behind these values is in docs/tuning.md.
"""

from transformer.configs import multi30k_gpu


def get_config():
  config = multi30k_gpu.get_config()
  config.model.update(dropout_rate=0.1, dtype="float32")
  config.data.update(tokens_per_batch=2048, eval_batch_size=256)
  # rsqrt schedule: lr = lr_scale / sqrt(d_model) * min(step^-0.5, step * warmup^-1.5)
  config.optimizer.update(warmup_steps=400, lr_scale=0.7)
  config.num_train_steps = 1400
  config.eval_every_steps = 350
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 3
  config.average_last_checkpoints = 3
  config.decode.beam_size = 4
  return config
