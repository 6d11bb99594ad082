"""What a trained run is, as inference needs it: its task, model sizes and sequence limit.

Read from the run's config.json (written by training) without the training schema, so loading a
model for translation depends on the model's own configuration only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from transformer.model.config import TransformerConfig
from transformer.model.transformer import FAMILIES

CONFIG_FILENAME = "config.json"


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A run's task ("translation", "lm" or "mlm"), its model's configuration, and the longest
  sequence it was trained on (its data.max_len, EOS included)."""

  task: str
  model: TransformerConfig
  data_max_len: int

  @property
  def max_source_tokens(self) -> int:
    """The longest source a translation may read, EOS included."""
    return min(self.data_max_len, self.model.max_len)

  def to_dict(self) -> dict[str, Any]:
    return {"task": self.task, "model": dataclasses.asdict(self.model),
            "data_max_len": self.data_max_len}

  @classmethod
  def from_dict(cls, values: dict[str, Any], source: Path) -> RunSpec:
    """The spec of a config.json's or model.json's values; a value that cannot describe a model
    is named with the file it came from."""
    try:
      task, model, max_len = values["task"], values["model"], values["data_max_len"]
      if task not in FAMILIES:
        raise ValueError(f"task={task!r} is unknown")
      if not isinstance(model, dict):
        raise ValueError("model is not a mapping")
      fields = {f.name for f in dataclasses.fields(TransformerConfig)}
      unknown = sorted(set(model) - fields)
      if unknown:
        raise ValueError(f"model.{unknown[0]} is not a model setting")
      config = TransformerConfig(**model)
      if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"data_max_len={max_len!r} is not a length")
    except (KeyError, TypeError, ValueError) as error:
      what = f"no {error}" if isinstance(error, KeyError) else str(error)
      raise ValueError(f"{source} does not describe a model ({what}): restore the file from "
                       "the run, or train again") from None
    return cls(task=task, model=config, data_max_len=max_len)


def read_json(path: Path) -> dict[str, Any]:
  """A JSON object from `path`, with a one-line error naming the file when it is missing, cut
  short or not an object."""
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: point --workdir at a run directory that "
                            "training has written")
  try:
    values = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON ({error}): restore the file from the run, or "
                     "train again") from None
  if not isinstance(values, dict):
    raise ValueError(f"{path} holds a {type(values).__name__}, not a JSON object: restore the "
                     "file from the run, or train again")
  return values


def read_spec(workdir: Path) -> RunSpec:
  """The spec of the run in `workdir`, from its config.json."""
  path = Path(workdir) / CONFIG_FILENAME
  values = read_json(path)
  data = values.get("data")
  data = data if isinstance(data, dict) else {}
  model = values.get("model")
  if isinstance(model, dict) and "vocab_size" not in model and "vocab_size" in data:
    model = {**model, "vocab_size": data["vocab_size"]}
  # data.max_len was data.max_length in runs of version 0.1.
  flat = {"task": values.get("task"), "model": model,
          "data_max_len": data.get("max_len", data.get("max_length"))}
  return RunSpec.from_dict({k: v for k, v in flat.items() if v is not None}, path)
