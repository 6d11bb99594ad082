"""A run's record: its configuration, typed, read and written in one place.

The schema is written once, as frozen dataclasses: each part of the package owns its block
(`TransformerConfig` in model/, `DataConfig` in data/, `DecodeConfig` in decode/,
`ParallelConfig` in parallel/), and `Config` here holds them with the optimizer's and the
training loop's own settings. Each block checks its own values when built; `Config` checks how
blocks fit together.

Three ways in, one schema:
  recipes        configs/NAME.py start from `get_config()`, an `ml_collections` rendering of
                 the defaults that the command line overrides (`--config.model.d_model=256`);
  config.json    what training writes into its workdir (`write_config`) and every later command
                 reads back (`read_config`, the one reader, which also migrates the keys of
                 older runs, `MIGRATIONS`);
  Python         `Config(...)` or `Config.of(a ConfigDict or a nested dict)`.

The model's vocabulary is the tokenizer's: `model.vocab_size` is derived from `data.vocab_size`
(`DERIVED`), never set on its own. A char or byte vocabulary may leave data.vocab_size 0 (the
tokenizer's own size): training sets it once the tokenizer exists (`Config.with_vocab_size`),
before the model is built, and config.json records the size.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from transformer.data.config import DataConfig
from transformer.data.tokenizer import PAD_ID
from transformer.decode.config import DecodeConfig
from transformer.errors import MissingFile, UserError
from transformer.model.config import TransformerConfig
from transformer.parallel.config import ParallelConfig

CONFIG_FILENAME = "config.json"
# jax.random.key takes a signed 64-bit seed, and dropout is seeded with seed + 1.
MAX_SEED = 2**63 - 2
TASKS = ("translation", "lm", "mlm")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("rsqrt", "cosine", "constant")
DECAY_MASKS = ("all", "matrices")
NAN_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam(W), gradient clipping, the learning-rate schedule and gradient accumulation.

  Attributes:
    name: "adam" (the paper) or "adamw" (decoupled weight decay).
    b1, b2, eps: Adam's decay rates and epsilon (Section 5.3: 0.9, 0.98, 1e-9).
    weight_decay: AdamW's decay; 0 for Adam.
    weight_decay_mask: which parameters AdamW decays: "all", or "matrices" (those of 2 or more
      dimensions: projections and embeddings, not biases or LayerNorm scales, as GPT-2 and
      nanoGPT decay).
    schedule: "rsqrt" (the paper's warm-up then 1/sqrt(step), scaled by `lr_scale`), "cosine"
      (warm-up to `peak_learning_rate`, cosine decay to `end_learning_rate` at the last step) or
      "constant".
    end_learning_rate: where the cosine schedule ends (nanoGPT's min_lr); 0 by default.
    warmup_steps: updates of linear warm-up.
    lr_scale: multiplies the rsqrt schedule.
    peak_learning_rate: the cosine and constant schedules' rate.
    grad_clip_norm: clip the global gradient norm to this; 0 turns clipping off.
    grad_accum_steps: k micro-batches per update; their summed gradients are divided once by
      all their tokens, so an update equals one on a batch k times larger. Steps and the
      schedule count updates.
    flat_state: keep Adam's moments as one vector each and run the mean, the clipping and Adam
      on the gradients concatenated once (`optimizer.flattened`, `optimizer.scaled_and_clipped`):
      the same updates in a few long kernels instead of ~3 per parameter array (402 -> 344
      kernels, 0.5-0.9 ms of the shakespeare_char step's ~50 on a CPU core, on top of the 1.2 ms
      the moments' vector saved). One vector cannot be split over devices by parameter, so only
      without FSDP and tensor parallelism (parallel.fsdp = parallel.tensor = 1); checkpoints
      of the two layouts do not restore into each other.
  """

  name: str = "adam"
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-9
  weight_decay: float = 0.0
  weight_decay_mask: str = "all"
  schedule: str = "rsqrt"
  warmup_steps: int = 4000
  lr_scale: float = 1.0
  peak_learning_rate: float = 1e-3
  end_learning_rate: float = 0.0
  grad_clip_norm: float = 0.0
  grad_accum_steps: int = 1
  flat_state: bool = False

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise UserError(f"optimizer.name={self.name!r} is unknown: use one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      raise UserError(f"optimizer.schedule={self.schedule!r} is unknown: use one of {SCHEDULES}")
    if self.warmup_steps < 1:
      raise UserError(
        f"optimizer.warmup_steps must be >= 1 (the schedules divide by it), got {self.warmup_steps}"
      )
    for key in ("b1", "b2"):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise UserError(
          f"optimizer.{key} must be in [0, 1) (Adam's decay rate), got {getattr(self, key)}"
        )
    # Every rate finite: an infinite eps makes every update zero, an infinite weight decay or
    # learning rate makes the first one NaN; both pass a sign check.
    if not (self.eps > 0 and math.isfinite(self.eps)):
      raise UserError(
        f"optimizer.eps must be a finite number > 0 (it keeps Adam's division finite), got "
        f"{self.eps}"
      )
    for key in ("lr_scale", "peak_learning_rate"):
      if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
        raise UserError(f"optimizer.{key} must be a finite number > 0, got {getattr(self, key)}")
    for key in ("weight_decay", "grad_clip_norm"):
      if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
        raise UserError(
          f"optimizer.{key} must be a finite number >= 0 (0 turns it off), got {getattr(self, key)}"
        )
    if self.grad_accum_steps < 1:
      raise UserError(f"optimizer.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
    if self.weight_decay_mask not in DECAY_MASKS:
      raise UserError(
        f"optimizer.weight_decay_mask={self.weight_decay_mask!r} is unknown: use one of "
        f"{DECAY_MASKS}"
      )
    if not 0.0 <= self.end_learning_rate <= self.peak_learning_rate:
      raise UserError(
        f"optimizer.end_learning_rate={self.end_learning_rate} must be in [0, "
        f"peak_learning_rate={self.peak_learning_rate}]: the cosine decays to it"
      )


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
    measure_peak: measure the MFU reference (a matmul) again instead of reading the value
      cached for this machine (`transformer.train.report.peak_flop_per_s`).
    allow_config_change: keys (e.g. "model.activation", "data", or "all") that a resumed run
      may change from the config it was started with; any other change to the model or the
      data plan is refused, since the checkpoint's parameters or stream position would be
      misread.
  """

  task: str = "translation"
  seed: int = 0
  model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
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
  measure_peak: bool = False
  allow_config_change: tuple[str, ...] = ()
  decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

  def __post_init__(self):
    if self.task not in TASKS:
      raise UserError(f"task={self.task!r} is unknown: use one of {TASKS}")
    if self.seed < 0:
      raise UserError(f"seed must be >= 0, got {self.seed}")
    if self.seed > MAX_SEED:
      raise UserError(f"seed={self.seed} is too large: jax.random.key takes seeds up to {MAX_SEED}")
    for key in (
      "num_train_steps",
      "log_every_steps",
      "eval_every_steps",
      "checkpoint_every_steps",
      "keep_checkpoints",
    ):
      if getattr(self, key) <= 0:
        raise UserError(f"{key} must be positive, got {getattr(self, key)}")
    _derive(self)
    if self.task == "translation" and self.data.dataset == "text":
      # Caught here, not after the tokenizer and caches are built from the text.
      raise UserError(
        "data.dataset=text is running text for task=lm or task=mlm, not pairs to translate: "
        "set --config.task=lm (or mlm), or give translation pairs with data.dataset=parallel "
        "(train_files such as train.{lang}.txt or a .tsv of source<TAB>target lines)"
      )
    object.__setattr__(self, "allow_config_change", change_keys(self.allow_config_change))
    if self.model.pad_id != PAD_ID:
      # Batches are padded with the tokenizer's PAD (id 0); another pad_id would mask a real
      # piece as padding and never emit it.
      raise UserError(
        f"model.pad_id={self.model.pad_id}: the tokenizer pads with id {PAD_ID}; leave "
        f"model.pad_id at {PAD_ID}"
      )
    if self.data.max_len > self.model.max_len:
      raise UserError(
        f"data.max_len={self.data.max_len} exceeds model.max_len="
        f"{self.model.max_len}: raise model.max_len or lower data.max_len"
      )
    if self.profile_steps and (
      len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
    ):
      raise UserError(
        f"profile_steps={self.profile_steps} must be two steps first,last with "
        "1 <= first <= last, e.g. --config.profile_steps=10,12"
      )
    if self.profile_steps and self.profile_steps[1] > self.num_train_steps:
      first, last = self.profile_steps
      raise UserError(
        f"profile_steps={first},{last} ends after num_train_steps={self.num_train_steps}: the "
        f"run never reaches step {last}; profile steps within 1..{self.num_train_steps}, or "
        "raise num_train_steps"
      )
    if self.optimizer.flat_state and (self.parallel.fsdp != 1 or self.parallel.tensor != 1):
      raise UserError(
        "optimizer.flat_state keeps Adam's moments as one vector, which FSDP and tensor "
        f"parallelism cannot split (parallel.fsdp={self.parallel.fsdp}, "
        f"parallel.tensor={self.parallel.tensor}): set optimizer.flat_state=False, or both to 1"
      )
    if self.nan_policy not in NAN_POLICIES:
      raise UserError(f"nan_policy={self.nan_policy!r} is unknown: use one of {NAN_POLICIES}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if not 0 <= self.average_last_checkpoints <= self.keep_checkpoints:
      raise UserError(
        f"average_last_checkpoints={self.average_last_checkpoints} must be in "
        f"[0, keep_checkpoints={self.keep_checkpoints}]: only kept checkpoints "
        "can be averaged; raise keep_checkpoints or lower it"
      )

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Config:
    """The typed config of a nested dict (a recipe's `to_dict()`, a run's config.json).

    Keys the schema lacks are refused by name; keys of older runs are migrated (`MIGRATIONS`);
    a derived key that is present (config.json has them) must agree with its source.
    """
    values, given = _given_derived(_migrated(values))
    config = build_block(cls, values, prefix="")
    for key, value in given.items():
      if value != _get(config, key):
        raise UserError(
          f"{key}={value} differs from {DERIVED[key]}={_get(config, key)}: {DERIVED_WHY[key]}"
        )
    return config

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

  def with_vocab_size(self, vocab_size: int) -> Config:
    """This config with data.vocab_size (and so the model's) set: how a run whose char or byte
    vocabulary takes the tokenizer's own size (0) records it once the tokenizer exists."""
    return dataclasses.replace(self, data=dataclasses.replace(self.data, vocab_size=vocab_size))


# ------------------------------------------------------------------------------------------------
# Derived keys: set from another key, never on their own
# ------------------------------------------------------------------------------------------------

# {derived key: its source}. The model's vocabulary is the tokenizer's.
DERIVED = {"model.vocab_size": "data.vocab_size"}
DERIVED_WHY = {"model.vocab_size": "the model's vocabulary is the tokenizer's; set data.vocab_size"}


def _get(config: Any, key: str) -> Any:
  for part in key.split("."):
    config = getattr(config, part)
  return config


def _derive(config: Config) -> None:
  """Sets every derived key of a freshly built `config` from its source (frozen blocks are
  replaced, so `Config(data=DataConfig(vocab_size=V))` has a model of V pieces)."""
  for key, source in DERIVED.items():
    block, name = key.split(".")
    value = _get(config, source)
    if value == 0:  # data.vocab_size 0: the tokenizer's own, set once it is known (`resolved`)
      continue
    if getattr(getattr(config, block), name) != value:
      changed = dataclasses.replace(getattr(config, block), **{name: value})
      object.__setattr__(config, block, changed)


def _given_derived(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(values without the derived keys, the derived keys' given values)."""
  values, given = dict(values), {}
  for key in DERIVED:
    block, name = key.split(".")
    if isinstance(values.get(block), Mapping) and name in values[block]:
      values[block] = dict(values[block])
      given[key] = values[block].pop(name)
  return values, given


def derived_key_message(key: str) -> str | None:
  """Why `key` cannot be set, if it is a derived key (for the command line's unknown keys)."""
  return f"{key} cannot be set: {DERIVED_WHY[key]}" if key in DERIVED else None


# ------------------------------------------------------------------------------------------------
# allow_config_change: keys of the schema
# ------------------------------------------------------------------------------------------------


def change_keys(given: str | tuple[str, ...]) -> tuple[str, ...]:
  """allow_config_change as keys of the schema: entries split at commas (the command line
  gives `--config.allow_config_change=data.vocab_size,model.vocab_size` as one string), each a
  key, a block or "all"; a key the schema lacks would allow nothing, so it is refused."""
  entries = (given,) if isinstance(given, str) else given
  keys = tuple(k.strip() for entry in entries for k in str(entry).split(",") if k.strip())
  for key in keys:
    if key != "all" and key not in schema_keys():
      close = difflib.get_close_matches(key, sorted(schema_keys()), n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise UserError(
        f"allow_config_change names {key!r}, which is no config key{hint}: name keys such as "
        "model.d_ff, blocks such as data, or all, separated by commas"
      )
  return keys


@functools.cache
def schema_keys() -> frozenset[str]:
  """Every key of the schema, blocks ("model") and values ("model.d_ff") alike."""
  return frozenset(_keys(Config, ""))


def _keys(cls, prefix: str) -> Iterator[str]:
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    yield prefix + field.name
    if dataclasses.is_dataclass(hints[field.name]):
      yield from _keys(hints[field.name], f"{prefix}{field.name}.")


# ------------------------------------------------------------------------------------------------
# config.json: the run's record on disk
# ------------------------------------------------------------------------------------------------

# Keys renamed since version 0.1, whose config.json files still load: (block, old, new).
MIGRATIONS = (
  ("data", "max_length", "max_len"),
  ("decode", "max_extra_length", "max_extra_tokens"),
)


def _migrated(values: Mapping[str, Any]) -> dict[str, Any]:
  if not isinstance(values, Mapping):
    raise UserError(f"the config must be a mapping of keys to values, got {type(values).__name__}")
  values = dict(values)
  for block, old, new in MIGRATIONS:
    if isinstance(values.get(block), Mapping) and old in values[block]:
      moved = dict(values[block])
      moved.setdefault(new, moved.pop(old))
      moved.pop(old, None)
      values[block] = moved
  return values


def read_json(path: Path) -> dict[str, Any]:
  """A JSON object from `path`, with a one-line error naming the file when it is missing, cut
  short or not an object."""
  if not path.is_file():
    raise MissingFile(
      f"{path} is missing: point --workdir at a run directory that training has written"
    )
  try:
    values = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
    reason = "nested too deeply" if isinstance(error, RecursionError) else error
    raise UserError(
      f"{path} is not valid JSON ({reason}): restore the file from the run, or train again"
    ) from None
  if not isinstance(values, dict):
    raise UserError(
      f"{path} holds a {type(values).__name__}, not a JSON object: restore the file from the "
      "run, or train again"
    )
  return values


def read_config(workdir: str | os.PathLike) -> Config:
  """The config a run was trained with: WORKDIR/config.json, migrated and checked. The one
  reader of that file: every command that uses a run reads it here."""
  path = Path(workdir) / CONFIG_FILENAME
  values = read_json(path)
  # Training writes every key; a record without these describes no run (an emptied file).
  missing = [key for key in ("task", "model", "data") if key not in values]
  if missing:
    raise UserError(
      f"{path} does not describe a run (no {missing[0]!r}): restore the file from the run, or "
      "train again"
    )
  try:
    return Config.from_dict(values)
  except UserError as error:
    raise UserError(f"{path}: {error}: restore the file from the run, or train again") from None


def write_config(workdir: str | os.PathLike, config: Config) -> Path:
  """Writes WORKDIR/config.json whole or not at all (a temporary file renamed into place)."""
  path = Path(workdir) / CONFIG_FILENAME
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def get_config() -> ml_collections.ConfigDict:
  """Every key a recipe or the command line can set, at its default. The dict is locked, so an
  unknown key is an error, and recipes in configs/ only change values."""
  values, _ = _given_derived(Config().to_dict())
  config = ml_collections.ConfigDict(values)
  config.lock()
  return config


def build_block(cls, values: Mapping[str, Any], prefix: str):
  """`cls(**values)`, recursing into dataclass fields, with tuples from lists and unknown keys
  named; each block's own checks run as it is built."""
  if not isinstance(values, Mapping):
    raise UserError(
      f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys to "
      f"values, got {type(values).__name__}"
    )
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise UserError(
      f"unknown config key {prefix}{unknown[0]}: see the schema in transformer/config.py"
    )
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      kwargs[name] = build_block(hint, value, f"{prefix}{name}.")
    else:
      kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
  return cls(**kwargs)


def _coerce(value, hint, key: str):
  """`value` as the schema's type: a tuple from a list, a float from an int; anything else of
  the wrong type is an error that names the key."""
  origin = typing.get_origin(hint)
  if origin is typing.Literal:
    allowed = typing.get_args(hint)
    if value not in allowed:
      raise UserError(f"{key}={value!r} is unknown: use one of {allowed}")
    return value
  elif origin is tuple:
    element = typing.get_args(hint)[0]
    example = "(16, 32)" if element is int else "('test_2016', 'test_2017')"
    if not isinstance(value, list | tuple):
      raise UserError(f"{key} must be a tuple such as {example}, got {value!r}")
    try:
      return tuple(_coerce(v, element, key) for v in value)
    except ValueError:
      raise UserError(
        f"{key} must be a tuple of {element.__name__} such as {example}, got {value!r}"
      ) from None
  elif origin in (typing.Union, types.UnionType):
    return value
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool) and (
    not isinstance(value, hint) or (hint is int and isinstance(value, bool))
  ):
    raise UserError(f"{key} must be {hint.__name__}, got {value!r}")
  return value
