"""What a run keeps on disk is checked when it is read: checkpoint arrays against checksums that
catch flips and swaps, the stream record against its hash, a missing checksum record refused,
model.json against its own hash."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer.errors import UserError
from transformer.runs.artifact import META_FILENAME, MODEL_DIRNAME, read_model, record_scores
from transformer.runs.checkpoint import (
  Checkpointer,
  CheckpointError,
  Record,
  _legacy_sums,
  checksums,
)

STREAM = {"epoch": 1, "chunk": 0, "batch": 7}


def state_of(values: np.ndarray) -> dict:
  return {"params": {"w": jnp.asarray(values)}}


def base_values() -> np.ndarray:
  values = np.linspace(-3.0, 3.0, 64, dtype=np.float32).reshape(8, 8)
  values[0, 0], values[5, 3] = 2.0, -2.0
  return values


def flipped_signs(values: np.ndarray) -> np.ndarray:
  out = values.copy()
  out[1, 1], out[6, 2] = -out[1, 1], -out[6, 2]  # two sign bits: +2^31 twice, 0 mod 2^32
  return out


def swapped(values: np.ndarray) -> np.ndarray:
  out = values.copy()
  out[0, 0], out[5, 3] = out[5, 3], out[0, 0]  # +2.0 and -2.0 trade places
  return out


@pytest.mark.parametrize("damage", [flipped_signs, swapped])
def test_checksums_change_where_the_plain_sums_do_not(damage):
  """The damage is chosen so that the earlier sums (a word sum and an odd-weighted word sum,
  mod 2^32) miss it; the mixed checksums catch it."""
  before, after = state_of(base_values()), state_of(damage(base_values()))
  assert checksums(before, _legacy_sums) == checksums(after, _legacy_sums)
  assert checksums(before) != checksums(after)


def save(directory, values, record=None):
  record = record or Record(STREAM)
  checkpointer = Checkpointer(directory, asynchronous=False)
  checkpointer.save(1, state_of(values), record)
  checkpointer.close()


def restore(directory):
  checkpointer = Checkpointer(directory, asynchronous=False)
  try:
    abstract = {"params": {"w": jnp.zeros((8, 8), jnp.float32)}}
    return checkpointer.restore(abstract)
  finally:
    checkpointer.close()


@pytest.mark.parametrize("damage", [flipped_signs, swapped])
def test_a_checkpoint_whose_arrays_were_changed_is_refused(damage, tmp_path, caplog):
  """The arrays of another save (the damaged values) put in place of the saved ones, with the
  saved checksums kept: the restore names the damage."""
  save(tmp_path / "good", base_values())
  save(tmp_path / "bad", damage(base_values()))
  shutil.rmtree(tmp_path / "good" / "1" / "state")
  shutil.copytree(tmp_path / "bad" / "1" / "state", tmp_path / "good" / "1" / "state")
  with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged"):
    restore(tmp_path / "good")
  assert "1 arrays differ from their checksums, e.g. params/w" in caplog.text


def test_a_checkpoint_without_its_checksums_is_refused(tmp_path, caplog):
  save(tmp_path, base_values())
  shutil.rmtree(tmp_path / "1" / "checksums")
  with pytest.raises(CheckpointError, match="damaged"):
    restore(tmp_path)
  assert "its checksums are missing" in caplog.text


def test_a_changed_stream_record_is_refused(tmp_path, caplog):
  save(tmp_path, base_values())
  (path,) = [p for p in (tmp_path / "1" / "data").iterdir() if p.name == "metadata"]
  record = json.loads(path.read_text())
  record["stream"]["batch"] = 0  # the stream would restart its epoch
  path.write_text(json.dumps(record))
  with pytest.raises(CheckpointError, match="damaged"):
    restore(tmp_path)
  assert "data record (the input stream's position) differs from its checksum" in caplog.text


def test_an_intact_checkpoint_restores_its_values_and_record(tmp_path):
  save(tmp_path, base_values(), Record(STREAM, elapsed_s=12.5))
  state, record, step = restore(tmp_path)
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), base_values())
  assert (step, record.stream, record.elapsed_s) == (1, STREAM, 12.5)


@pytest.fixture
def exported(tmp_path, tokenizer, write_run):
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  return write_run(tmp_path, model, tokenizer, task="translation", data_max_length=32)


@pytest.mark.parametrize(
  "field, value", [(("model", "activation"), "gelu"), (("model", "layer_norm_epsilon"), 0.5)]
)
def test_an_edited_model_json_is_refused(exported, field, value):
  path = exported / MODEL_DIRNAME / META_FILENAME
  meta = json.loads(path.read_text())
  meta[field[0]][field[1]] = value
  path.write_text(json.dumps(meta, indent=2))
  with pytest.raises(UserError, match="does not match its own checksum"):
    read_model(exported)


def test_scores_join_model_json_and_keep_it_readable(exported):
  record_scores(exported, {"test_2016": {"bleu": 30.5}, "validation": {"loss": 3.2}})
  _, _, _, meta = read_model(exported)
  assert meta["scores"] == {"test_2016": {"bleu": 30.5}, "validation": {"loss": 3.2}}
