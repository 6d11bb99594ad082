"""Multi-host start-up: one JAX process per host, joined through `jax.distributed`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

import jax

from transformer.errors import UserError
from transformer.parallel import supervisor
from transformer.parallel.config import ParallelConfig
from transformer.parallel.supervisor import JOB_ENVIRONMENT

log = logging.getLogger(__name__)


def initialize(parallel: ParallelConfig) -> None:
  """Joins the processes of a multi-host job, from the config or the usual environment.

  With `parallel.coordinator_address` set, the config names the coordinator, the process count
  and this process's id. Otherwise JAX's own detection covers SLURM, Open MPI, Kubernetes
  and Cloud TPU pods; `JAX_COORDINATOR_ADDRESS` opts in elsewhere. A single process does nothing.
  """
  if jax.distributed.is_initialized():
    return
  if parallel.coordinator_address:
    # Cross-process collectives on CPU devices (tests, CPU clusters); GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      parallel.coordinator_address,
      num_processes=parallel.num_processes,
      process_id=parallel.process_id,
    )
  elif any(os.environ.get(name) for name in JOB_ENVIRONMENT):
    jax.distributed.initialize()
  else:
    return
  supervisor.report_joined()
  log.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _client():
  """JAX's coordination-service client (its key-value store and barriers)."""
  from jax._src import distributed

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialized")
  return client


def on_first_process(fn: Callable[[], object], name: str, *, timeout_s: float) -> None:
  """Runs `fn` on process 0 while the other processes wait for it, up to `timeout_s`.

  What `fn` writes (a tokenizer, prepared data) is then complete for every process, and no two
  processes write it at once. If `fn` fails on process 0 the others stop at once with its
  one-line message, instead of waiting; if process 0 dies silently they stop at the timeout.
  With one process `fn` simply runs.
  """
  if jax.process_count() == 1:
    fn()
    return
  client = _client()
  key = f"transformer/{name}"
  what = name.replace("-", " ")
  if jax.process_index() == 0:
    try:
      fn()
    except BaseException as error:
      text = " ".join(str(error).split()) or type(error).__name__
      client.key_value_set(f"{key}/failed", text)
      _meet(client, f"{key}/failure-seen")  # let the others read it before this process exits
      raise
    client.key_value_set(f"{key}/done", "ok")
    return
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if _lookup(client, f"{key}/done") is not None:
      return
    failure = _lookup(client, f"{key}/failed")
    if failure is not None:
      _meet(client, f"{key}/failure-seen")
      raise UserError(f"process 0 failed while {what}: {failure}")
    time.sleep(0.2)
  raise UserError(
    f"process 0 did not finish {what} within {timeout_s:.0f} s: see its log, "
    "or raise parallel.barrier_timeout_s"
  )


def _lookup(client, key: str) -> str | None:
  """The key's value, None while it is not set; a lost coordinator is an error."""
  try:
    return client.key_value_try_get(key)
  except Exception as error:
    if "NOT_FOUND" in str(error) or "not found" in str(error).lower():
      return None
    raise UserError(
      f"lost the job's coordinator (process 0) while waiting for it: "
      f"{' '.join(str(error).split())[:200]}"
    ) from None


def _meet(client, barrier: str) -> None:
  """Waits (a little) for every process at `barrier`; a process already gone is no reason to
  wait longer."""
  with contextlib.suppress(Exception):  # the client raises one type for every status
    client.wait_at_barrier(barrier, 30_000)
