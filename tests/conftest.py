"""Test setup: 8 virtual CPU devices and strict NumPy semantics, fixed before JAX is imported.

Shared fixtures: `tokenizer`, a SentencePiece model trained on 300 Multi30k sentence pairs, and
`write_run`, which saves a model the way a training run leaves it (config.json, spm.model, a
checkpoint).
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Token caches and prepared tfds data shared by this session's runs, not by the user's.
os.environ.setdefault("TRANSFORMER_CACHE_DIR", tempfile.mkdtemp(prefix="transformer-cache-"))
# Compiled executables shared by this session's processes (the tests' training subprocesses
# included): the many runs of the same small models compile each step once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import pytest
from flax import nnx

from transformer.data.multi30k import DEFAULT_SOURCE_DIR, read_lines
from transformer.data.tokenizer import MODEL_FILENAME, Tokenizer, train_sentencepiece
from transformer.runs.artifact import export_model
from transformer.runs.checkpoint import Checkpointer, Record
from transformer.runs.params import model_params
from transformer.runs.spec import RunSpec

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` run only where JAX sees a GPU."""
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
  sentences = (
    read_lines(DEFAULT_SOURCE_DIR / "val.en.gz")[:300]
    + read_lines(DEFAULT_SOURCE_DIR / "val.de.gz")[:300]
  )
  path = tmp_path_factory.mktemp("spm") / MODEL_FILENAME
  return Tokenizer(train_sentencepiece(sentences, path, vocab_size=250))


@pytest.fixture(scope="session")
def write_run():
  """`write_run(workdir, model, tokenizer, task=..., data_max_length=...)` saves config.json,
  spm.model, a checkpoint (step 1) and the exported model into workdir, as training leaves
  them."""
  return _write_run


def _write_run(
  workdir: Path, model: nnx.Module, tokenizer: Tokenizer, *, task: str, data_max_length: int
) -> Path:
  config = {
    "task": task,
    "model": dataclasses.asdict(model.config),
    "data": {"max_length": data_max_length, "vocab_size": model.config.vocab_size},
  }
  (workdir / "config.json").write_text(json.dumps(config, indent=2))
  shutil.copy(tokenizer.model_path, workdir / MODEL_FILENAME)
  checkpointer = Checkpointer(workdir / "checkpoints", asynchronous=False)
  checkpointer.save(1, {"params": nnx.state(model, nnx.Param)}, Record({}))
  checkpointer.close()
  spec = RunSpec(task, model.config, data_max_length)
  export_model(workdir, spec, model_params(model), tokenizer.model_path, {"step": 1})
  return workdir
