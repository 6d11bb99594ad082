"""What a run keeps on disk is checked when it is read: checkpoint arrays against checksums that
catch flips and swaps, the stream record against its hash, a missing checksum record refused,
model.json against its own hash."""

import json
import re
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from transformer import EncoderDecoder, TransformerConfig
from transformer.errors import UserError
from transformer.runs import checkpoint
from transformer.runs.artifact import (
  META_FILENAME,
  MODEL_DIRNAME,
  PARAMS_FILENAME,
  _write_meta,
  read_model,
  record_scores,
  sha256,
)
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


def numpy_checksums(x: np.ndarray) -> list[int]:
  """The module docstring's checksum in NumPy: per seed, the sum mod 2^32 over the 32-bit words
  of fmix32(word XOR fmix32(its position + seed)), fmix32 being MurmurHash3's finalizer."""

  def fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))

  if x.dtype.itemsize == 4:
    words = x.view(np.uint32).ravel()
  else:  # 16-bit elements widened
    words = x.view(np.uint16).astype(np.uint32).ravel()
  position = np.arange(words.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    return [
      int(np.sum(fmix32(words ^ fmix32(position + np.uint32(seed))), dtype=np.uint32))
      for seed in (0x9E3779B9, 0x7F4A7C15)
    ]


@pytest.mark.parametrize("where", ["host", "compiled"])
def test_checksums_are_the_documented_formula_per_array(where, monkeypatch):
  """Each array's pair equals the formula written out in NumPy, for float32, int32 and bfloat16
  arrays of several shapes, whether summed on the host (arrays in this process's CPU memory) or
  by the compiled programs (arrays elsewhere; one program per shape)."""
  if where == "compiled":
    monkeypatch.setattr(checkpoint, "_on_host", lambda x: False)
  rng = np.random.default_rng(0)
  arrays = {
    "a": rng.standard_normal((8, 8)).astype(np.float32),
    "b": rng.standard_normal((8, 8)).astype(np.float32),
    "c": rng.integers(-5, 5, (3, 7)).astype(np.int32),
    "d": rng.standard_normal(33).astype(jnp.bfloat16),
  }
  got = checksums({name: jnp.asarray(x) for name, x in arrays.items()})
  assert got == {name: numpy_checksums(np.asarray(x)) for name, x in arrays.items()}


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


def test_an_emptied_stream_record_is_refused(tmp_path, caplog):
  """A data item of {} would restart the stream from its start, silently."""
  save(tmp_path, base_values())
  (path,) = [p for p in (tmp_path / "1" / "data").iterdir() if p.name == "metadata"]
  path.write_text("{}")
  with pytest.raises(CheckpointError, match="damaged"):
    restore(tmp_path)
  assert "data record (the input stream's position) is empty" in caplog.text


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


# ------------------------------------------------------------------------------------------------
# An export that was tampered with, its hashes rewritten to match: the hashes cannot tell, the
# schema and the parameter file's header can. Each is refused before any allocation.
# ------------------------------------------------------------------------------------------------


def rewrite_meta(workdir, change) -> None:
  """model.json changed by `change(meta)` and written with a self-hash that matches."""
  path = workdir / MODEL_DIRNAME / META_FILENAME
  meta = json.loads(path.read_text())
  change(meta)
  _write_meta(path, meta)


def rewrite_params(workdir, change) -> None:
  """params.safetensors changed by `change({name: array})`, its SHA-256 in model.json updated."""
  folder = workdir / MODEL_DIRNAME
  params = load_file(str(folder / PARAMS_FILENAME))
  change(params)
  save_file(params, str(folder / PARAMS_FILENAME))
  rewrite_meta(workdir, lambda meta: meta.update(params_sha256=sha256(folder / PARAMS_FILENAME)))


def first_matrix(params: dict) -> str:
  """A weight matrix of a layer (not the embedding, whose size bounds the vocabulary)."""
  return next(
    name for name, value in sorted(params.items()) if "layers" in name and value.ndim == 2
  )


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda m: m.update(format=99), "is of format 99"),
    (lambda m: m.update(format=True), "is of format True"),
    (lambda m: m.update(format="2"), "is of format '2'"),
    (lambda m: m.update(extra=1), "has a field 'extra' that model.json does not have"),
    (lambda m: m.pop("decode"), "lacks the field 'decode'"),
    (lambda m: m.update(step="1"), "has step='1', which is not of type int or NoneType"),
    (lambda m: m.update(averaged_steps=[1.5]), "averaged_steps=[1.5], which is not a list"),
    (lambda m: m["model"].update(d_model=32.0), "model.d_model must be int, got 32.0"),
    (lambda m: m["model"].update(max_len=32.5), "model.max_len must be int, got 32.5"),
    (lambda m: m["model"].update(activation="swish"), "model.activation='swish' is unknown"),
    (lambda m: m["model"].update(pad_id=5), "model.pad_id=5"),
    (lambda m: m.update(data_max_len=1e3), "data_max_len=1000.0, which is not of type int"),
    (lambda m: m.update(data_max_len=1), "data_max_len=1 is not a length"),
  ],
)
def test_model_json_outside_its_schema_is_refused(exported, change, message):
  rewrite_meta(exported, change)
  with pytest.raises(UserError, match=re.escape(message)):
    read_model(exported)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("d_ff", 10**10, "gives model.d_ff=10000000000, more than"),
    ("vocab_size", 10**9, "gives model.vocab_size=1000000000, more than"),
    ("num_encoder_layers", 10**6, "gives model.num_encoder_layers=1000000, more than"),
    ("max_len", 10**8, "gives model.max_len=100000000, a position table far larger"),
    ("d_ff", 128, "does not fit the model that"),
    ("num_decoder_layers", 3, "does not fit the model that"),
  ],
)
def test_sizes_the_parameter_file_does_not_hold_are_refused_before_allocation(
  exported, field, value, message
):
  rewrite_meta(exported, lambda meta: meta["model"].update({field: value}))
  began = time.perf_counter()
  with pytest.raises(UserError, match=re.escape(message)):
    read_model(exported)
  assert time.perf_counter() - began < 30  # no 40 GB allocation, no million-layer trace


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda p, k: p.update({k: np.full_like(p[k], np.nan)}), "holds NaN or infinite values"),
    (lambda p, k: p.update({k: np.full_like(p[k], np.inf)}), "holds NaN or infinite values"),
    (lambda p, k: p.update({k: p[k].astype(np.int32)}), "is of dtype I32, not a floating-point"),
    (lambda p, k: p.update({k: p[k] > 0}), "is of dtype BOOL, not a floating-point"),
    (lambda p, k: p.update({k: p[k][:1]}), "does not fit the model that"),
    (lambda p, k: p.update({k + "_extra": p[k]}), "is not the model's"),
    (lambda p, k: p.pop(k), "is missing"),
  ],
)
def test_a_parameter_file_of_other_values_is_refused(exported, change, message):
  rewrite_params(exported, lambda params: change(params, first_matrix(params)))
  with pytest.raises(UserError, match=re.escape(message)):
    read_model(exported)


def test_an_edited_position_is_refused(exported):
  """Fields that change no shape (activation, position) are covered by the self-hash only."""
  path = exported / MODEL_DIRNAME / META_FILENAME
  meta = json.loads(path.read_text())
  meta["model"]["position"] = "rope"
  path.write_text(json.dumps(meta, indent=2))
  with pytest.raises(UserError, match="does not match its own checksum"):
    read_model(exported)


def test_an_untouched_export_passes_every_check(exported):
  spec, params, _, meta = read_model(exported)
  assert meta["format"] == 2 and spec.search.beam_size == meta["decode"]["beam_size"]
  assert all(np.isfinite(value).all() for value in params.values())


def test_every_file_of_an_export_is_readable_by_every_user(tmp_path, tokenizer, monkeypatch):
  """params.safetensors was written 0600 (safetensors' own mode) while the rest was 0644."""
  import os
  import stat

  from transformer.runs.artifact import export_model
  from transformer.runs.params import model_params
  from transformer.runs.spec import RunSpec

  old = os.umask(0o022)
  try:
    model = EncoderDecoder(
      TransformerConfig.tiny(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0)
    )
    folder = export_model(
      tmp_path,
      RunSpec("translation", model.config, 32),
      model_params(model),
      tokenizer.model_path,
      {},
    )
  finally:
    os.umask(old)
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
  assert modes == {PARAMS_FILENAME: 0o644, "spm.model": 0o644, META_FILENAME: 0o644}


def test_a_folder_of_only_the_export_translates_with_its_own_search(tmp_path, tokenizer):
  """A folder holding only model/ (no config.json) searches as the run was scored (here beam
  3, 7 extra tokens, the exact stop rule), not with the defaults (beam 4, 50, heuristic)."""
  from transformer.decode.config import DecodeConfig
  from transformer.runs.artifact import export_model
  from transformer.runs.params import model_params
  from transformer.runs.spec import RunSpec
  from transformer.runs.translator import Translator

  model = EncoderDecoder(TransformerConfig.tiny(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
  search = DecodeConfig(beam_size=3, alpha=0.8, max_extra_tokens=7, stop="exact")
  spec = RunSpec("translation", model.config, 32, search)
  export_model(tmp_path, spec, model_params(model), tokenizer.model_path, {})
  assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_DIRNAME]
  translator = Translator(tmp_path)
  assert (translator.search.beam_size, translator.search.alpha) == (3, 0.8)
  assert (translator.search.max_extra_tokens, translator.search.stop) == (7, "exact")
