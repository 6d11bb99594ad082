"""The paper's big model on WMT 2014 English->German (Table 3, "big"; 28.4 BLEU in the paper)."""

from transformer.configs import wmt14_base


def get_config():
  config = wmt14_base.get_config()
  config.model.update(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
  config.num_train_steps = 300_000  # 3.5 days on 8 P100s (Section 5.2)
  # 10-minute intervals as in the paper: 600 steps at its 1.0 s per step, so the 20 averaged
  # checkpoints span the last 12k steps (the base recipe's 1500 would span 30k).
  config.checkpoint_every_steps = 600
  config.average_last_checkpoints = 20  # "averaged the last 20 checkpoints" (Section 6.1)
  config.keep_checkpoints = 20
  return config
