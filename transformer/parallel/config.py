"""How a run spreads over devices and hosts: the `parallel` block of the run's configuration."""

from __future__ import annotations

import dataclasses
import math

from transformer.errors import UserError

STRATEGIES = ("jit", "shard_map")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Mesh axis sizes, the train step's strategy, and the multi-host coordinator.

  Attributes:
    data, fsdp, tensor: sizes of the mesh axes; one of them may be -1 to take the devices left
      over (see `transformer.parallel.axes` for what each axis splits).
    strategy: "jit" (NamedSharding, the pjit model) or "shard_map" (pmap-style data parallelism).
    coordinator_address, num_processes, process_id: a multi-host job's coordinator (host:port
      of process 0; IPv6 as [::1]:1234) and this process's place in it; "" lets JAX detect
      SLURM, Open MPI, Kubernetes or Cloud TPU (num_processes and process_id left unset).
    barrier_timeout_s: how long the other processes wait for process 0 to prepare the data and
      the tokenizer before they stop with an error.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  strategy: str = "jit"
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1
  barrier_timeout_s: float = 7200.0

  def __post_init__(self):
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    if list(sizes.values()).count(-1) > 1:
      raise UserError(
        f"parallel mesh {sizes} has more than one -1: let at most one axis fill in the rest"
      )
    if any(s == 0 or s < -1 for s in sizes.values()):
      raise UserError(f"parallel mesh {sizes}: sizes must be positive or -1")
    if not (self.barrier_timeout_s > 0 and math.isfinite(self.barrier_timeout_s)):
      raise UserError(
        f"parallel.barrier_timeout_s must be positive and finite, got {self.barrier_timeout_s}"
      )
    if self.strategy not in STRATEGIES:
      raise UserError(f"parallel.strategy={self.strategy!r} is unknown: use one of {STRATEGIES}")
    self._check_processes()

  def _check_processes(self) -> None:
    if not self.coordinator_address:
      # Without a coordinator `distributed.initialize` ignores these two (under SLURM or Cloud
      # TPU JAX reads them from the environment): several would silently train one process.
      if self.num_processes > 1 or self.process_id > 0:
        raise UserError(
          f"parallel.num_processes={self.num_processes}, parallel.process_id="
          f"{self.process_id} need parallel.coordinator_address (host:port of process 0) to "
          "join a job: set it, or leave both unset where JAX finds the job itself (SLURM, "
          "Open MPI, Kubernetes, Cloud TPU)"
        )
      return
    check_address(self.coordinator_address)
    if self.num_processes < 1 or self.process_id < 0 or self.process_id >= self.num_processes:
      raise UserError(
        "parallel.coordinator_address needs parallel.num_processes >= 1 and "
        "0 <= parallel.process_id < num_processes"
      )


def check_address(address: str) -> None:
  """Refuses a coordinator address that is not host:port (IPv6 as [::1]:1234): JAX splits the
  port off at the last colon, so a missing one fails inside JAX, and a port out of range
  waits for a coordinator that can never listen."""
  host, colon, port = address.rpartition(":")
  bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
  odd = any(c in "[]:" or c.isspace() for c in host) and not bracketed
  if not colon or not host or odd:
    raise UserError(
      f"parallel.coordinator_address={address!r} is not host:port: give process 0's host and "
      "a free port, e.g. 10.0.0.1:1234 (IPv6: [::1]:1234)"
    )
  if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
    raise UserError(
      f"parallel.coordinator_address={address!r} has port {port!r}: use a port in 1-65535, "
      "e.g. 10.0.0.1:1234"
    )
