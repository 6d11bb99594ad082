"""The one configuration schema. Files in configs/ start from `get_config()` and only set values."""

from __future__ import annotations

import dataclasses

import ml_collections

from transformer.data.tokenizer import check_vocab_size
from transformer.model.config import TransformerConfig
from transformer.train.optimizer import make_optimizer

TASKS = ("translation", "lm", "mlm")
TOKENIZER_TYPES = ("unigram", "bpe")  # SentencePiece model types


def get_config() -> ml_collections.ConfigDict:
  """Every key a run can set, with defaults. Unknown keys are rejected (the dict is locked)."""
  config = ml_collections.ConfigDict()
  config.task = "translation"         # translation (EncoderDecoder), lm (DecoderOnly), mlm (EncoderOnly)
  config.seed = 0
  config.model = ml_collections.ConfigDict(dataclasses.asdict(TransformerConfig()))

  config.data = ml_collections.ConfigDict(dict(
      dataset="multi30k",             # "multi30k" (shipped) or any tfds name, e.g. "wmt14_translate/de-en"
      source_dir="",                  # Multi30k text files; "" = the copy shipped in data/multi30k
      tfds_data_dir="",               # "" = <workdir>/tfds
      source_lang="en", target_lang="de",
      train_split="train", eval_split="validation", test_splits=("test_2016", "test_2017"),
      vocab_size=8000, tokenizer_type="unigram", tokenizer_sentences=1_000_000,
      max_length=64,                  # tokens, EOS included; longer pairs are dropped (or truncated)
      truncate=False,
      # target tokens (with padding) per global micro-batch; an update reads
      # optimizer.grad_accum_steps of them
      tokens_per_batch=4096,
      length_buckets=(),              # () = default boundaries up to max_length
      eval_batch_size=64,
      mlm_select_rate=0.15,
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0,
      schedule="rsqrt", warmup_steps=4000, lr_scale=1.0, peak_learning_rate=1e-3,
      # grad_accum_steps k > 1: each update sums the gradients of k micro-batches (one k-times
      # larger batch, divided once by its token count); num_train_steps and the schedule count
      # updates
      grad_clip_norm=0.0, grad_accum_steps=1,
  ))
  config.label_smoothing = 0.1

  config.num_train_steps = 100_000
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.average_last_checkpoints = 0   # >1: average the last k checkpoints' parameters at the end
  config.init_from = ""                  # a workdir whose parameters initialise this run
  config.nan_policy = "stop"             # "stop" or "skip" on a non-finite loss

  config.decode = ml_collections.ConfigDict(dict(
      beam_size=4, alpha=0.6, max_extra_length=50, num_examples=5,
      bleu_at_end=True,               # test sets are batched by data.eval_batch_size
  ))

  config.parallel = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,      # mesh axis sizes; one -1 takes the devices left over
      strategy="jit",                 # "jit" (NamedSharding, the pjit model) or "shard_map" (pmap-style)
      coordinator_address="", num_processes=0, process_id=-1,
  ))
  config.lock()
  return config


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  """The model's dataclass from the config's `model` block (validated there)."""
  return TransformerConfig(**config.model.to_dict())


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects impossible values with a message that names the key and the fix."""
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r} is unknown: use one of {TASKS}")
  for key in ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    if config[key] <= 0:
      raise ValueError(f"{key} must be positive, got {config[key]}")
  for key in ("max_length", "tokens_per_batch", "eval_batch_size", "vocab_size"):
    if config.data[key] <= 0:
      raise ValueError(f"data.{key} must be positive, got {config.data[key]}")
  check_vocab_size(config.data.vocab_size)
  if config.data.max_length > config.model.max_len:
    raise ValueError(f"data.max_length={config.data.max_length} exceeds model.max_len="
                     f"{config.model.max_len}: raise model.max_len or lower data.max_length")
  if config.data.tokenizer_type not in TOKENIZER_TYPES:
    raise ValueError(f"data.tokenizer_type={config.data.tokenizer_type!r} is unknown: use one of "
                     f"{TOKENIZER_TYPES}")
  if config.nan_policy not in ("stop", "skip"):
    raise ValueError(f"nan_policy={config.nan_policy!r} is unknown: use stop or skip")
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
  if not 0 <= config.average_last_checkpoints <= config.keep_checkpoints:
    raise ValueError(f"average_last_checkpoints={config.average_last_checkpoints} must be in "
                     f"[0, keep_checkpoints={config.keep_checkpoints}]: only kept checkpoints "
                     "can be averaged; raise keep_checkpoints or lower it")
  _validate_optimizer(config)
  _validate_decode(config.decode)
  model_config(config)


def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
  opt = config.optimizer
  if opt.warmup_steps < 1:
    raise ValueError(f"optimizer.warmup_steps must be >= 1 (the schedules divide by it), got "
                     f"{opt.warmup_steps}")
  for key in ("b1", "b2"):
    if not 0.0 <= opt[key] < 1.0:
      raise ValueError(f"optimizer.{key} must be in [0, 1) (Adam's decay rate), got {opt[key]}")
  if opt.eps <= 0:
    raise ValueError(f"optimizer.eps must be positive (it keeps Adam's division finite), got "
                     f"{opt.eps}")
  for key in ("lr_scale", "peak_learning_rate"):
    if opt[key] <= 0:
      raise ValueError(f"optimizer.{key} must be positive, got {opt[key]}")
  for key in ("weight_decay", "grad_clip_norm"):
    if opt[key] < 0:
      raise ValueError(f"optimizer.{key} must be >= 0 (0 turns it off), got {opt[key]}")
  if opt.grad_accum_steps < 1:
    raise ValueError("optimizer.grad_accum_steps must be >= 1")
  make_optimizer(config)  # unknown optimizer.name or optimizer.schedule


def _validate_decode(decode: ml_collections.ConfigDict) -> None:
  """Checked before training, so a bad value does not surface only at the final BLEU."""
  if decode.beam_size < 1:
    raise ValueError(f"decode.beam_size must be >= 1 (1 = greedy), got {decode.beam_size}")
  if decode.alpha < 0:
    raise ValueError(f"decode.alpha (length penalty) must be >= 0, got {decode.alpha}")
  for key in ("max_extra_length", "num_examples"):
    if decode[key] < 0:
      raise ValueError(f"decode.{key} must be >= 0, got {decode[key]}")
