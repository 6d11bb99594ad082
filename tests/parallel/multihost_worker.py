"""One of two processes of a localhost multi-host run: `python multihost_worker.py PORT ID`.

Each process owns 4 CPU devices and feeds only its half of every batch; the 8-device mesh spans
both. Prints the losses as JSON on the last line.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

sys.path.insert(0, os.path.dirname(__file__))


def main(port: str, process_id: str, checkpoint_dir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  import harness

  from transformer.parallel.sharding import abstract_with_shardings, logical_shardings
  from transformer.runs.checkpoint import Checkpointer, Record

  assert jax.device_count() == 8 and jax.local_device_count() == 4
  losses, state = harness.train(harness.mesh_of(data=4, fsdp=2), num_steps=3)
  # Both processes write their shards of one checkpoint, then read it back onto another mesh.
  checkpointer = Checkpointer(checkpoint_dir, keep=1)
  checkpointer.save(3, state, Record({"epoch": 0, "chunk": 0, "batch": 3}))
  checkpointer.wait()
  target = logical_shardings(state, harness.mesh_of(fsdp=2, tensor=4))
  restored, _, _ = checkpointer.restore(abstract_with_shardings(target, state))
  checkpointer.close()
  print(
    json.dumps(
      {
        "process": jax.process_index(),
        "losses": losses,
        "checksum": harness.checksum(restored.params),
      }
    )
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
