"""The paper's base model on WMT 2014 English->German (Table 3, "base"; 27.3 BLEU in the paper).

Needs tfds `wmt14_translate/de-en` prepared under data.tfds_data_dir (downloading it needs the
network; preparing as ArrayRecord needs no TensorFlow). 8 GPUs x 25k source + 25k target tokens per
batch and 100k steps as in Section 5.2; a shared source-target byte-pair-encoding vocabulary of
37k pieces (SentencePiece's BPE trainer).
"""

from transformer.config import get_config as base_config


def get_config():
  config = base_config()
  config.model.update(
    d_model=512,
    num_heads=8,
    d_ff=2048,
    num_encoder_layers=6,
    num_decoder_layers=6,
    dropout_rate=0.1,
    max_len=256,
    dtype="bfloat16",
  )
  config.data.update(
    dataset="wmt14_translate/de-en",
    source_lang="en",
    target_lang="de",
    train_split="train",
    eval_split="validation",
    test_splits=("test",),
    vocab_size=37_000,
    tokenizer_type="bpe",
    tokenizer_sentences=4_000_000,
    max_len=256,
    tokens_per_batch=25_000,
    eval_batch_size=256,
  )
  config.optimizer.update(warmup_steps=4000, lr_scale=1.0)
  config.label_smoothing = 0.1
  config.num_train_steps = 100_000
  config.eval_every_steps = 5000
  # The paper wrote checkpoints at 10-minute intervals: 1500 steps at its 0.4 s per step.
  config.checkpoint_every_steps = 1500
  config.keep_checkpoints = 5
  config.average_last_checkpoints = 5  # "averaging the last 5 checkpoints" (Section 6.1)
  config.decode.update(beam_size=4, alpha=0.6, max_extra_tokens=50)
  return config
