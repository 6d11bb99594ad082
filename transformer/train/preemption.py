"""Stopping on a signal: every process stops after the same step and they save it together.

One process: SIGTERM and SIGINT only record the request (the handler does nothing else), and
the loop stops after the step it is in.

Several processes (a cluster job): the scheduler may signal the hosts at different moments, or
only one of them. A host that left the loop alone would leave the others waiting in the next
step's collectives, and a save needs every process. JAX's preemption service already solves
this: its handler turns SIGTERM into a notice that the coordination service spreads to every
process, and `multihost_utils.reached_preemption_sync_point(step)`, called at every step, is
true on all of them at the same step (the largest step any process had reached, plus one).
Here SIGTERM is left to that handler, and a Ctrl-C (SIGINT) is turned into a SIGTERM to this
process, so it takes the same path.
"""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils


def _preemption_service() -> bool:
  from jax._src import distributed

  return distributed.global_state.preemption_sync_manager is not None


class StopRequest:
  """The loop asks `stop_now(step)` before each step; `reason` says what stopped it."""

  def __init__(self):
    self.reason: str | None = None
    self._shared = jax.process_count() > 1 and _preemption_service()
    handled: tuple[signal.Signals, ...] = (
      (signal.SIGINT,) if self._shared else (signal.SIGTERM, signal.SIGINT)
    )
    # SIGHUP (the terminal closed) stops like Ctrl-C, unless nohup ignores it.
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
      handled += (signal.SIGHUP,)
    self._previous = {s: signal.signal(s, self._handle) for s in handled}

  def _handle(self, signum, frame) -> None:
    del frame
    if self._shared:  # JAX's SIGTERM handler tells every process; ask it to
      os.kill(os.getpid(), signal.SIGTERM)
    self.reason = self.reason or signal.Signals(signum).name

  def stop_now(self, step: int) -> bool:
    """Whether to stop before step `step` + 1: the same answer, at the same step, on every
    process (it must be called at every step)."""
    if self._shared:
      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = self.reason or "SIGTERM (on this or another process)"
        return True
      return False
    return self.reason is not None

  def restore(self) -> None:
    """Puts the previous handlers back."""
    for s, handler in self._previous.items():
      signal.signal(s, handler)
