"""An encoder-only (BERT-style) masked language model on the German side of Multi30k, CPU-sized.

15% of tokens are selected, 80/10/10 masked/random/kept, as in BERT. Training settings are the
decoder-only recipe's (configs/lm.py), with a lower peak learning rate.
"""

from transformer.configs import lm


def get_config():
  config = lm.get_config()
  config.task = "mlm"
  config.model.update(num_encoder_layers=4, num_decoder_layers=0, norm="post")
  config.data.mlm_select_rate = 0.15
  config.optimizer.peak_learning_rate = 5e-4
  return config
