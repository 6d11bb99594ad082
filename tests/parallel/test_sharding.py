"""Data, FSDP, tensor and data x tensor parallelism and the shard_map path on 8 CPU devices."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer import EncoderDecoder
from transformer.parallel.mesh import check_divisible, global_batch
from transformer.parallel.sharding import abstract_with_shardings, logical_shardings, shard
from transformer.parallel.strategies import compile_train_step
from transformer.runs.checkpoint import Checkpointer, Record
from transformer.train.setup import initial_state
from transformer.train.step import make_steps, micro_batches

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
  state, _, _ = harness.setup(mesh)
  arrays = jax.tree.leaves(state)
  large = [a for a in arrays if a.size >= 1024]
  assert large
  for array in large:
    assert not array.sharding.is_fully_replicated, (array.shape, array.sharding)
    assert array.addressable_shards[0].data.size == array.size // 8


@pytest.mark.slow
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


def one_update(mesh, strategy: str, batch, *, grad_accum_steps: int = 1, dropout_rate=0.0):
  """The state and metrics after one update of the harness model (with dropout_rate) on `batch`."""
  model = EncoderDecoder(
    dataclasses.replace(harness.CONFIG, dropout_rate=dropout_rate),
    rngs=nnx.Rngs(params=0, dropout=1),
  )
  tx = optax.sgd(0.5, momentum=0.9)
  state, shardings = shard(initial_state(model, tx), mesh)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  steps = make_steps(
    graphdef,
    rest,
    tx,
    task="translation",
    label_smoothing=0.1,
    dropout_key=jax.random.key(0),
    grad_accum_steps=grad_accum_steps,
  )
  step = compile_train_step(strategy, steps, shardings, mesh)
  with jax.set_mesh(mesh):
    return step(state, global_batch(batch, mesh))


@pytest.fixture(scope="module")
def two_micro_batches():
  """An update's batch whose two micro-batches (rows 0::2 and 1::2, see `micro_batches`) have
  very different token counts, and one update on all its rows at once."""
  first, second = harness.fixed_batch(0), harness.fixed_batch(1)
  second["targets"][:, 3:] = 0
  interleaved = {
    k: np.stack([first[k], second[k]], axis=1).reshape(-1, *first[k].shape[1:]) for k in first
  }  # [2B, T]
  split = micro_batches(jax.tree.map(jnp.asarray, interleaved), 2)
  np.testing.assert_array_equal(split["targets"][0], first["targets"])
  np.testing.assert_array_equal(split["targets"][1], second["targets"])
  assert np.sum(first["targets"] != 0) > 2 * np.sum(second["targets"] != 0)
  return interleaved, one_update(harness.mesh_of(data=8), "jit", interleaved)


@pytest.mark.slow
@pytest.mark.parametrize(
  "axes,strategy", [(dict(data=2, fsdp=2, tensor=2), "jit"), (dict(data=8), "shard_map")]
)
def test_accumulated_micro_batches_make_one_update_on_their_concatenation(
  axes, strategy, two_micro_batches
):
  """Gradients summed over the micro-batches, divided once by all their tokens."""
  batch, (want_state, want_metrics) = two_micro_batches
  state, metrics = one_update(harness.mesh_of(**axes), strategy, batch, grad_accum_steps=2)
  assert int(state.step) == 1 and int(metrics["steps"]) == 1
  for key in ("loss_sum", "tokens"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shard_map_draws_different_dropout_masks_on_each_device():
  """The same row on 8 devices: identical masks would make the summed loss exactly 8 times the
  loss of that row on one device (whose data index, 0, is device 0's)."""
  row = {k: np.repeat(v[:1], 8, axis=0) for k, v in harness.fixed_batch(0).items()}
  _, eight = one_update(harness.mesh_of(data=8), "shard_map", row, dropout_rate=0.5)
  _, one = one_update(
    harness.mesh_of(devices=jax.devices()[:1]),
    "shard_map",
    {k: v[:1] for k, v in row.items()},
    dropout_rate=0.5,
  )
  np.testing.assert_allclose(eight["tokens"], 8 * one["tokens"])
  assert abs(float(eight["loss_sum"]) - 8 * float(one["loss_sum"])) > 1e-3 * float(
    eight["loss_sum"]
  )


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  saved_mesh, restore_mesh = harness.mesh_of(data=8), harness.mesh_of(fsdp=2, tensor=4)
  _, saved_state = harness.train(saved_mesh, num_steps=1)
  checkpointer = Checkpointer(tmp_path, keep=1)
  checkpointer.save(1, saved_state, Record({"epoch": 0, "chunk": 0, "batch": 1}))
  checkpointer.wait()
  target_shardings = logical_shardings(saved_state, restore_mesh)
  restored, record, step = checkpointer.restore(
    abstract_with_shardings(target_shardings, saved_state)
  )
  checkpointer.close()
  assert step == 1 and record.stream == {"epoch": 0, "chunk": 0, "batch": 1}
  for got, want, sharding in zip(
    jax.tree.leaves(restored), jax.tree.leaves(saved_state), jax.tree.leaves(target_shardings)
  ):
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
  "axes,message",
  [
    (dict(data=3, fsdp=-1), "does not divide the 8 devices"),
    (dict(data=-1, tensor=-1), "more than one -1"),
    (dict(data=2, tensor=2), "needs 4 devices but 8 are present"),
  ],
)
def test_bad_mesh_is_a_clear_error(axes, message):
  with pytest.raises(ValueError, match=message):
    harness.mesh_of(**axes)


def test_undividable_heads_or_batch_is_a_clear_error():
  mesh = harness.mesh_of(data=2, tensor=4)
  with pytest.raises(ValueError, match="num_heads=6 is not divisible by the tensor axis"):
    check_divisible(mesh, num_heads=6, d_ff=64, d_model=32, vocab_size=64)
  with pytest.raises(
    ValueError, match=r"data\.eval_batch_size=3 does not split over data x fsdp = 2 devices"
  ):
    check_divisible(mesh, num_heads=8, d_ff=64, d_model=32, vocab_size=64, batch_size=3)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_reproduce_single_process_losses(tmp_path):
  """jax.distributed on localhost: 2 processes x 4 CPU devices vs. this process's 8 devices,
  then a checkpoint written by both processes and restored onto a 2 x 4 fsdp x tensor mesh."""
  want, state = harness.train(harness.mesh_of(data=4, fsdp=2), num_steps=3)
  worker = Path(__file__).with_name("multihost_worker.py")
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [
    subprocess.Popen(
      [sys.executable, str(worker), port, str(i), str(tmp_path / "ckpt")],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  for result in results:
    np.testing.assert_allclose(result["losses"], want, rtol=1e-5, atol=1e-6)
    assert result["checksum"] == pytest.approx(harness.checksum(state.params), rel=1e-5)


def test_activations_follow_the_logical_rules():
  """Under a data x fsdp x tensor mesh the compiled step pins the activations as the rules say:
  rows over data x fsdp, the feed-forward hidden layer and the vocabulary over tensor, the
  residual stream whole per row (a weight's D axis is split over fsdp, an activation's is not)."""
  mesh = harness.mesh_of(data=2, fsdp=2, tensor=2)
  state, _, step = harness.setup(mesh)
  with jax.set_mesh(mesh):
    text = step.lower(state, global_batch(harness.fixed_batch(0), mesh)).as_text()
  rows = '{"data", "fsdp"}'
  for layout in (
    [rows, "{}", "{}"],  # [B, T, D]
    [rows, "{}", '{"tensor"}'],  # [B, T, F] and [B, T, V]
    [rows, "{}", '{"tensor"}', "{}"],
  ):  # [B, T, N, H]
    assert "sdy.sharding_constraint %" in text and f"[{', '.join(layout)}]>" in text, layout


@pytest.mark.parametrize("strategy", ["jit", "shard_map"])
def test_the_compiled_step_holds_no_constant_of_the_seed(strategy):
  """The dropout key is an argument of the compiled step: runs of two seeds lower to one program
  (the persistent compilation cache then serves the second), and the masks still follow the
  key: the two steps' losses differ with dropout on."""
  mesh = harness.mesh_of(data=8)
  config = harness.CONFIG.replace(dropout_rate=0.3)
  model = EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1))
  tx = optax.sgd(0.1)
  texts, losses = [], []
  for seed in (0, 1):
    state, shardings = shard(initial_state(model, tx), mesh)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    steps = make_steps(
      graphdef, rest, tx, task="translation", label_smoothing=0.0, dropout_key=jax.random.key(seed)
    )
    step = compile_train_step(strategy, steps, shardings, mesh)
    with jax.set_mesh(mesh):
      batch = global_batch(harness.fixed_batch(0), mesh)
      texts.append(step.lower(state, batch).as_text())
      losses.append(float(step(state, batch)[1]["loss_sum"]))
  assert texts[0] == texts[1]
  assert losses[0] != losses[1]
