"""Data, FSDP, tensor and data x tensor parallelism and the shard_map path on 8 CPU devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import harness
from transformer.parallel.mesh import check_divisible, logical_shardings
from transformer.train.checkpoint import Checkpointer
from transformer.train.loop import abstract_with_shardings

LAYOUTS = {
    "data": (dict(data=8), "jit"),
    "fsdp": (dict(fsdp=8), "jit"),
    "tensor": (dict(tensor=8), "jit"),
    "data_x_tensor": (dict(data=2, tensor=4), "jit"),
    "data_x_fsdp_x_tensor": (dict(data=2, fsdp=2, tensor=2), "jit"),
    "shard_map": (dict(data=8), "shard_map"),
}


@pytest.fixture(scope="module")
def single_device():
  return harness.train(harness.mesh_of(devices=jax.devices()[:1]), num_steps=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_step_matches_single_device(layout, single_device):
  axes, strategy = LAYOUTS[layout]
  losses, state = harness.train(harness.mesh_of(**axes), num_steps=1, strategy=strategy)
  want_losses, want_state = single_device
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_fsdp_shards_every_large_array():
  mesh = harness.mesh_of(fsdp=8)
  state, shardings, _ = harness.setup(mesh)
  arrays = jax.tree.leaves(state)
  large = [a for a in arrays if a.size >= 1024]
  assert large
  for array in large:
    assert not array.sharding.is_fully_replicated, (array.shape, array.sharding)
    assert array.addressable_shards[0].data.size == array.size // 8


def test_per_device_parameter_memory_falls_with_fsdp():
  sizes = []
  for fsdp in (1, 2, 4, 8):
    mesh = harness.mesh_of(data=8 // fsdp, fsdp=fsdp)
    state, _, step = harness.setup(mesh)
    with jax.set_mesh(mesh):
      batch = harness.global_batch(harness.fixed_batch(0), mesh)
      compiled = step.lower(state, batch).compile()
    sizes.append(compiled.memory_analysis().argument_size_in_bytes)
  assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 4, sizes


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  saved_mesh, restore_mesh = harness.mesh_of(data=8), harness.mesh_of(fsdp=2, tensor=4)
  _, saved_state = harness.train(saved_mesh, num_steps=1)
  checkpointer = Checkpointer(tmp_path, keep=1)
  checkpointer.save(1, saved_state, {"epoch": 0, "batch_index": 1})
  checkpointer.wait()
  target_shardings = logical_shardings(saved_state, restore_mesh)
  restored, data_state, step = checkpointer.restore(
      abstract_with_shardings(target_shardings, saved_state))
  checkpointer.close()
  assert step == 1 and data_state == {"epoch": 0, "batch_index": 1}
  for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(saved_state),
                                 jax.tree.leaves(target_shardings)):
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("axes,message", [
    (dict(data=3, fsdp=-1), "does not divide the 8 devices"),
    (dict(data=-1, tensor=-1), "more than one -1"),
    (dict(data=2, tensor=2), "needs 4 devices but 8 are present"),
])
def test_bad_mesh_is_a_clear_error(axes, message):
  with pytest.raises(ValueError, match=message):
    harness.mesh_of(**axes)


def test_undividable_heads_or_batch_is_a_clear_error():
  mesh = harness.mesh_of(data=2, tensor=4)
  with pytest.raises(ValueError, match="num_heads=6 is not divisible by the tensor axis"):
    check_divisible(mesh, num_heads=6, d_ff=64, d_model=32, vocab_size=64)
  with pytest.raises(ValueError, match="batch of 3 rows does not split"):
    check_divisible(mesh, num_heads=8, d_ff=64, d_model=32, vocab_size=64, batch_size=3)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_reproduce_single_process_losses(tmp_path):
  """jax.distributed on localhost: 2 processes x 4 CPU devices vs. this process's 8 devices,
  then a checkpoint written by both processes and restored onto a 2 x 4 fsdp x tensor mesh."""
  want, state = harness.train(harness.mesh_of(data=4, fsdp=2), num_steps=3)
  worker = Path(__file__).with_name("multihost_worker.py")
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(worker), port, str(i), str(tmp_path / "ckpt")],
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  for result in results:
    np.testing.assert_allclose(result["losses"], want, rtol=1e-5, atol=1e-6)
    assert result["checksum"] == pytest.approx(harness.checksum(state.params), rel=1e-5)
