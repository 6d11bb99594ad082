"""Multi-host start-up: one JAX process per host, joined through `jax.distributed`."""

from __future__ import annotations

import logging
import os

import jax

from transformer.parallel.config import ParallelConfig

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
  elif (
    os.environ.get("JAX_COORDINATOR_ADDRESS")
    or os.environ.get("SLURM_JOB_ID")
    or os.environ.get("TPU_WORKER_HOSTNAMES")
  ):
    jax.distributed.initialize()
  else:
    return
  log.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
