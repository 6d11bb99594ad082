"""What a trained model is, as inference needs it: its task, model sizes, sequence limit, and the
search settings it was scored with.

Training writes it into the exported model's model.json (`transformer.runs.artifact`); for a
checkpoint it comes from the run's config (`transformer.config.read_config`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformer.config import Config, build_block
from transformer.data.tokenizer import PAD_ID
from transformer.decode.config import DecodeConfig
from transformer.errors import UserError
from transformer.model.config import TransformerConfig
from transformer.model.transformer import FAMILIES

# The search settings a model carries: how it was scored, and so how it translates by default.
SEARCH_KEYS = ("beam_size", "alpha", "max_extra_tokens", "stop")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A run's task ("translation", "lm" or "mlm"), its model's configuration, the longest
  sequence it was trained on (its data.max_len, EOS included), its search settings, and whether
  its language model read running text (dataset text: no BOS, windows across line breaks)."""

  task: str
  model: TransformerConfig
  data_max_len: int
  search: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
  running_text: bool = False

  @classmethod
  def of(cls, config: Config) -> RunSpec:
    running = config.task != "translation" and config.data.dataset == "text"
    return cls(config.task, config.model, config.data.max_len, config.decode, running)

  @property
  def max_source_tokens(self) -> int:
    """The longest source a translation may read, EOS included."""
    return min(self.data_max_len, self.model.max_len)

  def to_dict(self) -> dict[str, Any]:
    values = {
      "task": self.task,
      "model": dataclasses.asdict(self.model),
      "data_max_len": self.data_max_len,
      "decode": {key: getattr(self.search, key) for key in SEARCH_KEYS},
    }
    if self.running_text:  # absent otherwise: earlier exports stay as they were
      values["running_text"] = True
    return values

  @classmethod
  def from_dict(cls, values: dict[str, Any], source: Path) -> RunSpec:
    """The spec of a model.json's values, every field checked against the schema (types
    included); a value that cannot describe a model is named with the file it came from. A
    model.json of format 1 has no search settings: the defaults stand in."""
    try:
      task, model, max_len = values["task"], values["model"], values["data_max_len"]
      if task not in FAMILIES:
        raise UserError(f"task={task!r} is unknown")
      config = build_block(TransformerConfig, model, prefix="model.")
      if config.pad_id != PAD_ID:
        raise UserError(f"model.pad_id={config.pad_id} is not the tokenizer's PAD ({PAD_ID})")
      if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise UserError(f"data_max_len={max_len!r} is not a length")
      search = values.get("decode", {})
      if not isinstance(search, dict) or set(search) - set(SEARCH_KEYS):
        raise UserError(f"decode={search!r} is not a set of {', '.join(SEARCH_KEYS)}")
      decode = build_block(DecodeConfig, search, prefix="decode.")
      running = values.get("running_text", False)
      if not isinstance(running, bool):
        raise UserError(f"running_text={running!r} is not true or false")
    except KeyError as error:
      raise UserError(
        f"{source} does not describe a model (no {error}): restore the file from the run, or "
        "train again"
      ) from None
    except UserError as error:
      raise UserError(
        f"{source} does not describe a model ({error}): restore the file from the run, or "
        "train again"
      ) from None
    return cls(task=task, model=config, data_max_len=max_len, search=decode, running_text=running)
