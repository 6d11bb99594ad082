"""One of two processes of a localhost multi-host run: `python multihost_worker.py PORT ID`.

Each process owns 4 CPU devices and feeds only its half of every batch; the 8-device mesh spans
both. Prints the losses as JSON on the last line.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def main(port: str, process_id: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  import harness
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  losses, _ = harness.train(harness.mesh_of(data=4, fsdp=2), num_steps=3)
  print(json.dumps({"process": jax.process_index(), "losses": losses}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
