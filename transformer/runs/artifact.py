"""A run's final model as one folder, WORKDIR/model/, that translation, evaluation, inspection and
warm starts load by default: the parameters that were scored, with what it takes to use them.

  params.safetensors   every parameter by name ("decoder/layers/0/self_attention/query"), in
                       its stored dtype: readable without this package (safetensors, NumPy)
  spm.model            the tokenizer: a SentencePiece model, or vocab.json for a char or byte
                       vocabulary (model.json's "tokenizer_file" names which; none: spm.model)
  model.json           format version, task, model configuration, sequence limit, the search
                       settings it was scored with, which checkpoints were averaged, the scores,
                       the SHA-256 of the two files above, and a SHA-256 of its own other fields

The folder is written complete under a temporary name and then renamed into place; an older one
is renamed aside first and removed after, so WORKDIR/model is never a half-written mix. Every
file is checked against its SHA-256 when the folder is read: a damaged or hand-edited file is
refused by name. The hashes sit beside what they cover, so they catch accidents, not tampering.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from transformer.config import CONFIG_FILENAME, read_config, read_json
from transformer.data.tokenizer import TOKENIZER_FILENAMES
from transformer.errors import MissingFile, UserError
from transformer.runs.params import FlatParams
from transformer.runs.spec import RunSpec

MODEL_DIRNAME = "model"
PARAMS_FILENAME = "params.safetensors"
TOKENIZER_FILENAME = "spm.model"  # the tokenizer file of exports that do not name theirs
META_FILENAME = "model.json"
# 1: no search settings, no self-hash (still read); 2: both.
FORMAT_VERSION = 2
SELF_HASH_KEY = "model_json_sha256"


def sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _self_hash(meta: dict[str, Any]) -> str:
  """SHA-256 of model.json's fields other than this hash, in a canonical JSON form."""
  fields = {k: v for k, v in meta.items() if k != SELF_HASH_KEY}
  canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
  meta = {**{k: v for k, v in meta.items() if k != SELF_HASH_KEY}, SELF_HASH_KEY: ""}
  meta[SELF_HASH_KEY] = _self_hash(meta)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def export_model(
  workdir: Path, spec: RunSpec, params: FlatParams, tokenizer_path: Path, info: dict[str, Any]
) -> Path:
  """Writes WORKDIR/model/ (see the module docstring); `info` joins model.json (the step, the
  averaged checkpoints)."""
  from safetensors.numpy import save_file

  workdir = Path(workdir)
  final = workdir / MODEL_DIRNAME
  tmp = workdir / f".{MODEL_DIRNAME}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    save_file(
      {name: np.ascontiguousarray(value) for name, value in params.items()},
      str(tmp / PARAMS_FILENAME),
    )
    tokenizer_name = Path(tokenizer_path).name
    shutil.copyfile(tokenizer_path, tmp / tokenizer_name)
    for name in (PARAMS_FILENAME, tokenizer_name):  # readable by every user, as the rest
      os.chmod(tmp / name, 0o644)
    meta = {
      "format": FORMAT_VERSION,
      **spec.to_dict(),
      **info,
      "params_sha256": sha256(tmp / PARAMS_FILENAME),
      "tokenizer_sha256": sha256(tmp / tokenizer_name),
    }
    if tokenizer_name != TOKENIZER_FILENAME:  # exports of SentencePiece runs stay as they were
      meta["tokenizer_file"] = tokenizer_name
    _write_meta(tmp / META_FILENAME, meta)
    aside = workdir / f".{MODEL_DIRNAME}.old-{os.getpid()}"
    if final.exists():
      os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def record_scores(workdir: Path, scores: dict[str, Any]) -> None:
  """Adds `scores` (e.g. {"test_2016": {"bleu": ...}, "validation": {"loss": ...}}) to
  WORKDIR/model/model.json, which is rewritten whole with its hash."""
  path = Path(workdir) / MODEL_DIRNAME / META_FILENAME
  meta = read_meta(path)
  _write_meta(path, {**meta, "scores": {**meta.get("scores", {}), **scores}})


def read_meta(path: Path) -> dict[str, Any]:
  """model.json's fields, its format and self-hash checked."""
  meta = read_json(path)
  version = meta.get("format")
  if version not in (1, FORMAT_VERSION):
    raise UserError(
      f"{path} is of format {version!r}, which this version of the package does not read "
      f"(it reads 1 and {FORMAT_VERSION}): export the model again with this version"
    )
  if version >= 2 and meta.get(SELF_HASH_KEY) != _self_hash(meta):
    raise UserError(
      f"{path} does not match its own checksum: the file is damaged or was edited; export "
      "the model again (python -m transformer.evaluate --workdir DIR --export)"
    )
  return meta


def read_model(workdir: Path) -> tuple[RunSpec, FlatParams, Path, dict[str, Any]]:
  """(spec, parameters, tokenizer file, model.json) of WORKDIR/model, each file checked against
  the SHA-256 that model.json recorded: a damaged or edited export is refused, named."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  folder = Path(workdir) / MODEL_DIRNAME
  if not (folder / META_FILENAME).is_file():
    raise MissingFile(
      f"no exported model in {folder}: train the run to its end (it "
      "writes one), export one with `python -m transformer.evaluate "
      "--workdir DIR --export`, or pick a checkpoint with --step N"
    )
  meta = read_meta(folder / META_FILENAME)
  spec = RunSpec.from_dict(meta, folder / META_FILENAME)
  if meta["format"] == 1 and (Path(workdir) / CONFIG_FILENAME).is_file():
    # Format 1 kept no search settings: the run's own config has them.
    spec = dataclasses.replace(spec, search=read_config(workdir).decode)
  tokenizer_name = meta.get("tokenizer_file", TOKENIZER_FILENAME)
  if tokenizer_name not in TOKENIZER_FILENAMES:
    raise UserError(
      f"{folder / META_FILENAME} names the tokenizer file {tokenizer_name!r}, not one of "
      f"{', '.join(TOKENIZER_FILENAMES)}: export the model again"
    )
  for name, key in ((PARAMS_FILENAME, "params_sha256"), (tokenizer_name, "tokenizer_sha256")):
    path = folder / name
    if not path.is_file():
      raise MissingFile(f"{path} is missing: export the model again")
    if meta.get(key) != sha256(path):
      raise UserError(
        f"{path} does not match the checksum in {folder / META_FILENAME}: the "
        "file is damaged or was changed; export the model again"
      )
  try:
    params = load_file(str(folder / PARAMS_FILENAME))
  except (SafetensorError, OSError) as error:
    raise UserError(f"{folder / PARAMS_FILENAME} cannot be read ({error})") from None
  return spec, params, folder / tokenizer_name, meta
