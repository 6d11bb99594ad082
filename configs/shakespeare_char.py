"""nanoGPT's CPU benchmark: a character-level GPT on Tiny Shakespeare (or any text file).

Give the text on the command line:
  python train.py --config shakespeare_char --workdir runs/shakespeare \
    --config.data.train_files=input.txt

The settings of nanoGPT's README command for a CPU (`python train.py
config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`) with the rest of its config and train.py: 4 layers, 4 heads,
d 128 (d_ff 4 x 128), context 64, batch 12, no dropout, pre-LN, GELU, learned positions, tied
output, no biases (nanoGPT's bias=False), LayerNorm eps 1e-5; AdamW lr 1e-3 (b2 0.99, eps 1e-8),
weight decay 0.1 on matrices and embeddings only, gradient clipping at 1.0, 100 warm-up steps,
cosine to 1e-4 at step 2,000. The text is one document, its last 10% of characters held out
(nanoGPT's 90/10 split), one id per character. Each window of 65 characters trains 64
predictions, each reading the characters before it (nanoGPT's x, y = data[i:i+64],
data[i+1:i+65]).

Differences that remain: the project's own initialisation (Glorot matrices; token embeddings
scaled by sqrt(d) and learned positions both at unit variance, where GPT-2 starts both tables at
0.02); windows are cut at fixed places (moved each epoch) and visited in a shuffled order, where
nanoGPT draws 12 random offsets a step; validation is 256 windows spread over the held-out text at
each evaluation (nanoGPT: 20 random batches of 12).
"""

from transformer.config import get_config as base_config


def get_config():
  config = base_config()
  config.task = "lm"
  config.seed = 0
  config.model.update(
    d_model=128,
    num_heads=4,
    d_ff=512,
    num_encoder_layers=0,
    num_decoder_layers=4,
    dropout_rate=0.0,
    max_len=64,
    norm="pre",
    activation="gelu",
    position="learned",
    layer_norm_epsilon=1e-5,
    dtype="float32",
    use_bias=False,
  )
  config.data.update(
    dataset="text",
    validation_fraction=0.1,
    tokenizer_type="char",
    vocab_size=0,  # the text's characters + 5 special ids
    max_len=64,
    tokens_per_batch=12 * 64,
    # 16 windows a batch: an evaluation's steps took 0.26 CPU s against 0.37 s in batches of 128
    # and 0.25 s in batches of 8 (one core).
    eval_batch_size=16,
    eval_windows=256,
  )
  config.optimizer.update(
    name="adamw",
    schedule="cosine",
    peak_learning_rate=1e-3,
    end_learning_rate=1e-4,
    warmup_steps=100,
    weight_decay=0.1,
    weight_decay_mask="matrices",
    grad_clip_norm=1.0,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    flat_state=True,  # one device: the update in a few long kernels (see OptimizerConfig)
  )
  config.label_smoothing = 0.0
  config.num_train_steps = 2000
  config.log_every_steps = 50
  config.eval_every_steps = 250  # nanoGPT's eval_interval
  config.checkpoint_every_steps = 250  # nanoGPT saves at its evaluations
  config.keep_checkpoints = 1
  config.average_last_checkpoints = 0
  return config
