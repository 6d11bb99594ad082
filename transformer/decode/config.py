"""How translations are searched for and reported: the `decode` block of the run's configuration."""

from __future__ import annotations

import dataclasses
import math

from transformer.errors import UserError

# When a sentence's beam search ends (`transformer.decode.beam_search`): "heuristic" once its best
# alive hypothesis, ended with its next token, would not beat the best finished one; "exact" once
# none could at any length.
STOP_RULES = ("heuristic", "exact")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Beam search settings (Section 6.1: beam 4, length penalty 0.6) and the end-of-run report.

  Attributes:
    beam_size: W hypotheses per sentence; 1 is greedy decoding.
    alpha: the length penalty's exponent, lp(Y) = ((5 + |Y|) / 6)^alpha.
    max_extra_tokens: a translation has at most len(source) + this many tokens.
    stop: when a sentence's search ends, "heuristic" or "exact" (`STOP_RULES`); chosen on the
      validation split (docs/tuning.md): the same BLEU within 0.02 in 63% of the time.
    num_examples: translations printed after training, per test set.
    bleu_at_end: score the test sets once training ends.
    validation_bleu: at every evaluation also translate the validation split greedily and
      record its BLEU (eval/bleu_greedy), so a run's BLEU against time can be drawn.
  """

  beam_size: int = 4
  alpha: float = 0.6
  max_extra_tokens: int = 50
  stop: str = "heuristic"
  num_examples: int = 5
  bleu_at_end: bool = True
  validation_bleu: bool = True

  def __post_init__(self):
    check_search(self.beam_size, self.alpha, self.max_extra_tokens, prefix="decode.")
    check_stop(self.stop, prefix="decode.")
    if self.num_examples < 0:
      raise UserError(f"decode.num_examples must be >= 0, got {self.num_examples}")

  def overridden(
    self,
    *,
    beam_size: int | None = None,
    alpha: float | None = None,
    max_extra_tokens: int | None = None,
    stop: str | None = None,
  ) -> DecodeConfig:
    """These search settings where given (not None), this block's elsewhere: how a command's
    --beam_size, --alpha, --max_extra_tokens and --stop override the settings a run was scored
    with. The values are checked, named as the command line spells them."""
    beam_size = self.beam_size if beam_size is None else beam_size
    alpha = self.alpha if alpha is None else alpha
    max_extra_tokens = self.max_extra_tokens if max_extra_tokens is None else max_extra_tokens
    stop = self.stop if stop is None else stop
    check_search(beam_size, alpha, max_extra_tokens)
    check_stop(stop)
    return dataclasses.replace(
      self, beam_size=beam_size, alpha=alpha, max_extra_tokens=max_extra_tokens, stop=stop
    )


def check_search(beam_size: int, alpha: float, max_extra_tokens: int, prefix: str = "--") -> None:
  """One-line errors for impossible search settings, named as the caller spells them."""
  if beam_size < 1:
    raise UserError(f"{prefix}beam_size must be >= 1 (1 = greedy), got {beam_size}")
  if not math.isfinite(alpha) or alpha < 0:
    raise UserError(f"{prefix}alpha (length penalty) must be a finite number >= 0, got {alpha}")
  if max_extra_tokens < 0:
    raise UserError(f"{prefix}max_extra_tokens must be >= 0, got {max_extra_tokens}")


def check_stop(stop: object, prefix: str = "--") -> None:
  """A one-line error for a stop rule that is not one of `STOP_RULES`."""
  if stop not in STOP_RULES:
    raise UserError(f"{prefix}stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")


PAPER_SEARCH = DecodeConfig()  # beam 4, alpha 0.6 (Section 6.1), this package's stop rule
