"""The whole training job on a slice of Multi30k with a one-layer model."""

import json

import pytest

from transformer.configs import smoke
from transformer.train.loop import run

pytestmark = pytest.mark.slow  # each runs training end to end


def tiny_config(steps: int):
  config = smoke.get_config()
  config.num_train_steps = steps
  return config


def train_losses(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  results = run(tiny_config(6), workdir)
  return workdir, results


def test_run_trains_checkpoints_and_evaluates(uninterrupted):
  workdir, results = uninterrupted
  assert results["step"] == 6
  assert (workdir / "spm.model").exists() and (workdir / "results.json").exists()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    3,
    6,
  ]
  losses = train_losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert losses[6] < losses[1]
  assert results["eval/perplexity"] > 1 and 0 <= results["eval/accuracy"] <= 1
  assert "bleu/test_2016[:24]" in results
  translations = (workdir / "translations" / "test_2016[:24].txt").read_text().splitlines()
  assert len(translations) == 24


def test_resumed_run_reproduces_uninterrupted_losses(uninterrupted, tmp_path):
  """Stop after 3 steps, start again in the same workdir: steps 4-6 see the same batches,
  dropout masks and optimizer state, so the losses agree exactly."""
  reference, _ = uninterrupted
  run(tiny_config(3), tmp_path)
  results = run(tiny_config(6), tmp_path)
  assert results["step"] == 6
  want, got = train_losses(reference), train_losses(tmp_path)
  for step in range(1, 7):
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_language_model_families_train_and_transfer(task, tmp_path):
  """Decoder-only and encoder-only runs train and export their model, which then initialises
  (init_from) a new run: its parameters start as the exported ones."""
  import numpy as np

  from transformer.config import Config
  from transformer.runs.artifact import read_model
  from transformer.runs.params import model_params
  from transformer.train.setup import opened

  config = tiny_config(4)
  config.task = task
  config.model.update(
    num_encoder_layers=1 if task == "mlm" else 0, num_decoder_layers=1 if task == "lm" else 0
  )
  config.label_smoothing = 0.0
  results = run(config, tmp_path / "pretrain")
  losses = train_losses(tmp_path / "pretrain")
  assert results["step"] == 4 and losses[4] < losses[1]

  spec, exported, _, meta = read_model(tmp_path / "pretrain")
  assert spec.task == task and meta["step"] == 4
  # The same tokenizer, as init_from requires: copied from the pretraining run.
  (tmp_path / "finetune").mkdir()
  (tmp_path / "finetune" / "spm.model").write_bytes(
    (tmp_path / "pretrain" / "spm.model").read_bytes()
  )
  config.init_from = str(tmp_path / "pretrain")
  config.seed = 123
  with opened(Config.of(config), tmp_path / "finetune") as (job, state):
    started = model_params(job.model(state.params))
  assert started.keys() == exported.keys()
  for name, value in exported.items():
    np.testing.assert_array_equal(started[name], value, err_msg=name)


def test_accumulated_steps_are_updates_on_stacked_micro_batches(tmp_path):
  """grad_accum_steps=2: each of num_train_steps steps is one Adam update on two micro-batches of
  the shape a batch without accumulation has, and the logged learning rate is that update's."""
  import optax

  from transformer.config import Config
  from transformer.train.loop import train
  from transformer.train.metrics import MetricWriter
  from transformer.train.setup import opened

  config = tiny_config(2)
  config.optimizer.grad_accum_steps = 2
  writer = MetricWriter(tmp_path)
  try:
    with opened(Config.of(config), tmp_path) as (job, state):
      state = train(job, state, writer)
      # One stream batch per update: 2 micro-batches of 16 rows (512 tokens / length 32).
      assert job.inputs.train.state() == {"epoch": 0, "chunk": 0, "batch": 2}
      assert next(job.inputs.train)["targets"].shape == (32, 32)
  finally:
    writer.close()
  assert int(state.step) == 2
  counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
  assert counts and all(int(count) == 2 for _, count in counts)
  # Section 5.3 with d_model=32, warmup_steps=10, at update s = 1, 2 (still warming up).
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rates = {m["step"]: m["train/learning_rate"] for m in lines if "train/learning_rate" in m}
  assert rates == pytest.approx({s: 32**-0.5 * s * 10**-1.5 for s in (1, 2)}, rel=1e-6)
