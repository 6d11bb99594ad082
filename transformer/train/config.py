"""The run's configuration: typed, frozen blocks, one per part of the package, assembled here.

The schema is written once, as dataclasses: `TransformerConfig` (model), `DataConfig`,
`OptimizerConfig`, `DecodeConfig`, `ParallelConfig`, and `Config` holding them with the training
loop's own settings. Each block checks its own values when built; `Config` checks how blocks fit
together. Recipes in transformer/configs/ start from `get_config()`, an `ml_collections`
rendering of the defaults that the command line overrides (`--config.model.d_model=256`), and
`Config.from_dict` turns the result into the typed blocks that library code takes.

The model's vocabulary is the tokenizer's, `data.vocab_size`: it has no key of its own.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from transformer.data.config import DataConfig
from transformer.decode.config import DecodeConfig
from transformer.model.config import TransformerConfig
from transformer.parallel.config import ParallelConfig

TASKS = ("translation", "lm", "mlm")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("rsqrt", "cosine", "constant")
NAN_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam(W), gradient clipping, the learning-rate schedule and gradient accumulation.

  Attributes:
    name: "adam" (the paper) or "adamw" (decoupled weight decay).
    b1, b2, eps: Adam's decay rates and epsilon (Section 5.3: 0.9, 0.98, 1e-9).
    weight_decay: AdamW's decay; 0 for Adam.
    schedule: "rsqrt" (the paper's warm-up then 1/sqrt(step), scaled by `lr_scale`), "cosine"
      (warm-up to `peak_learning_rate`, cosine decay to 0 at the last step) or "constant".
    warmup_steps: updates of linear warm-up.
    lr_scale: multiplies the rsqrt schedule.
    peak_learning_rate: the cosine and constant schedules' rate.
    grad_clip_norm: clip the global gradient norm to this; 0 turns clipping off.
    grad_accum_steps: k micro-batches per update; their summed gradients are divided once by
      all their tokens, so an update equals one on a batch k times larger. Steps and the
      schedule count updates.
  """

  name: str = "adam"
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-9
  weight_decay: float = 0.0
  schedule: str = "rsqrt"
  warmup_steps: int = 4000
  lr_scale: float = 1.0
  peak_learning_rate: float = 1e-3
  grad_clip_norm: float = 0.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer.name={self.name!r} is unknown: use one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer.schedule={self.schedule!r} is unknown: use one of {SCHEDULES}")
    if self.warmup_steps < 1:
      raise ValueError(
        f"optimizer.warmup_steps must be >= 1 (the schedules divide by it), got {self.warmup_steps}"
      )
    for key in ("b1", "b2"):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(
          f"optimizer.{key} must be in [0, 1) (Adam's decay rate), got {getattr(self, key)}"
        )
    if not self.eps > 0:
      raise ValueError(
        f"optimizer.eps must be positive (it keeps Adam's division finite), got {self.eps}"
      )
    for key in ("lr_scale", "peak_learning_rate"):
      if not getattr(self, key) > 0:
        raise ValueError(f"optimizer.{key} must be positive, got {getattr(self, key)}")
    for key in ("weight_decay", "grad_clip_norm"):
      if not getattr(self, key) >= 0:
        raise ValueError(f"optimizer.{key} must be >= 0 (0 turns it off), got {getattr(self, key)}")
    if self.grad_accum_steps < 1:
      raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run is made of.

  Attributes:
    task: "translation" (EncoderDecoder), "lm" (DecoderOnly) or "mlm" (EncoderOnly).
    seed: initialisation, data order and dropout all derive from it.
    label_smoothing: epsilon_ls of Section 5.4.
    num_train_steps: optimizer updates of the whole run.
    log_every_steps, eval_every_steps, checkpoint_every_steps: intervals, in updates.
    keep_checkpoints: how many checkpoints are kept.
    average_last_checkpoints: > 1 averages the last k checkpoints' parameters at the end
      (Section 6.1); that average is the model that is scored and exported.
    init_from: a run directory whose parameters initialise this run.
    nan_policy: "stop" or "skip" the update on a non-finite loss or gradient.
    profile_steps: (first, last): a `jax.profiler` trace of these steps (1-based, inclusive)
      goes to WORKDIR/profile, for TensorBoard's profile plugin or Perfetto; () for none.
  """

  task: str = "translation"
  seed: int = 0
  model: TransformerConfig = dataclasses.field(
    default_factory=lambda: TransformerConfig(vocab_size=DataConfig.vocab_size)
  )
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  label_smoothing: float = 0.1
  num_train_steps: int = 100_000
  log_every_steps: int = 100
  eval_every_steps: int = 1000
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 3
  average_last_checkpoints: int = 0
  init_from: str = ""
  nan_policy: str = "stop"
  profile_steps: tuple[int, ...] = ()
  decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r} is unknown: use one of {TASKS}")
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")
    for key in (
      "num_train_steps",
      "log_every_steps",
      "eval_every_steps",
      "checkpoint_every_steps",
      "keep_checkpoints",
    ):
      if getattr(self, key) <= 0:
        raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
    if self.model.vocab_size != self.data.vocab_size:
      raise ValueError(
        f"model.vocab_size={self.model.vocab_size} differs from data.vocab_size="
        f"{self.data.vocab_size}: the model's vocabulary is the tokenizer's; "
        "set data.vocab_size only"
      )
    if self.data.max_len > self.model.max_len:
      raise ValueError(
        f"data.max_len={self.data.max_len} exceeds model.max_len="
        f"{self.model.max_len}: raise model.max_len or lower data.max_len"
      )
    if self.profile_steps and (
      len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
    ):
      raise ValueError(
        f"profile_steps={self.profile_steps} must be two steps first,last with "
        "1 <= first <= last, e.g. --config.profile_steps=10,12"
      )
    if self.nan_policy not in NAN_POLICIES:
      raise ValueError(f"nan_policy={self.nan_policy!r} is unknown: use one of {NAN_POLICIES}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if not 0 <= self.average_last_checkpoints <= self.keep_checkpoints:
      raise ValueError(
        f"average_last_checkpoints={self.average_last_checkpoints} must be in "
        f"[0, keep_checkpoints={self.keep_checkpoints}]: only kept checkpoints "
        "can be averaged; raise keep_checkpoints or lower it"
      )

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Config:
    """The typed config of a nested dict (a recipe's `to_dict()`, a run's config.json).

    Keys the schema lacks are refused by name; `model.vocab_size`, if present (config.json
    has it), must equal `data.vocab_size`.
    """
    values = _renamed(values)
    data = dict(values.get("data", {}))
    model = {"vocab_size": data.get("vocab_size", DataConfig.vocab_size), **values.get("model", {})}
    return _build(cls, {**values, "model": model}, prefix="")

  @classmethod
  def of(cls, config: Config | Mapping[str, Any] | ml_collections.ConfigDict) -> Config:
    """`config` as a Config: itself, or built from a recipe's ConfigDict or a nested dict."""
    if isinstance(config, Config):
      return config
    if isinstance(config, ml_collections.ConfigDict):
      config = config.to_dict()
    return cls.from_dict(config)

  def to_dict(self) -> dict[str, Any]:
    """Plain nested values (tuples as lists), as written to config.json."""
    return dataclasses.asdict(self)


# Keys renamed since version 0.1, whose config.json files still load: (block, old, new).
RENAMED = (("data", "max_length", "max_len"), ("decode", "max_extra_length", "max_extra_tokens"))


def _renamed(values: Mapping[str, Any]) -> dict[str, Any]:
  values = dict(values)
  for block, old, new in RENAMED:
    if isinstance(values.get(block), Mapping) and old in values[block]:
      moved = dict(values[block])
      moved.setdefault(new, moved.pop(old))
      moved.pop(old, None)
      values[block] = moved
  return values


def get_config() -> ml_collections.ConfigDict:
  """Every key a recipe or the command line can set, at its default. The dict is locked, so an
  unknown key is an error, and recipes in transformer/configs/ only change values."""
  values = Config().to_dict()
  del values["model"]["vocab_size"]  # data.vocab_size's: see the module docstring
  config = ml_collections.ConfigDict(values)
  config.lock()
  return config


def _build(cls, values: Mapping[str, Any], prefix: str):
  """`cls(**values)`, recursing into dataclass fields, with tuples from lists and unknown keys
  named; each block's own checks run as it is built."""
  if not isinstance(values, Mapping):
    raise ValueError(
      f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys to "
      f"values, got {type(values).__name__}"
    )
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
      f"unknown config key {prefix}{unknown[0]}: see the schema in transformer/train/config.py"
    )
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      kwargs[name] = _build(hint, value, f"{prefix}{name}.")
    else:
      kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
  return cls(**kwargs)


def _coerce(value, hint, key: str):
  """`value` as the schema's type: a tuple from a list, a float from an int; anything else of
  the wrong type is an error that names the key."""
  origin = typing.get_origin(hint)
  if origin is typing.Literal:
    hint = type(typing.get_args(hint)[0])
  elif origin is tuple:
    element = typing.get_args(hint)[0]
    example = "(16, 32)" if element is int else "('test_2016', 'test_2017')"
    if not isinstance(value, list | tuple):
      raise ValueError(f"{key} must be a tuple such as {example}, got {value!r}")
    try:
      return tuple(_coerce(v, element, key) for v in value)
    except ValueError:
      raise ValueError(
        f"{key} must be a tuple of {element.__name__} such as {example}, got {value!r}"
      ) from None
  elif origin in (typing.Union, types.UnionType):
    return value
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool) and (
    not isinstance(value, hint) or (hint is int and isinstance(value, bool))
  ):
    raise ValueError(f"{key} must be {hint.__name__}, got {value!r}")
  return value
