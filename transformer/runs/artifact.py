"""A run's final model as one folder, WORKDIR/model/, that translation, evaluation, inspection and
warm starts load by default: the parameters that were scored, with what it takes to use them.

  params.safetensors   every parameter by name ("decoder/layers/0/self_attention/query"), in
                       its stored dtype: readable without this package (safetensors, NumPy);
                       always per layer, also from a run with stacked layers (model.scan_layers,
                       written as the unrolled model it equals)
  spm.model            the tokenizer
  model.json           task, model configuration, sequence limit, which checkpoints were
                       averaged, the SHA-256 of the two files above, and the scores if any

The folder is written complete under a temporary name and then renamed into place; an older one
is renamed aside first and removed after, so WORKDIR/model is never a half-written mix.
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

from transformer.model.stacking import unstacked_params
from transformer.runs.params import FlatParams
from transformer.runs.spec import RunSpec, read_json

MODEL_DIRNAME = "model"
PARAMS_FILENAME = "params.safetensors"
TOKENIZER_FILENAME = "spm.model"
META_FILENAME = "model.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def export_model(workdir: Path, spec: RunSpec, params: FlatParams, tokenizer_path: Path,
                 info: dict[str, Any]) -> Path:
  """Writes WORKDIR/model/ (see the module docstring); `info` joins model.json (the step, the
  averaged checkpoints, scores)."""
  from safetensors.numpy import save_file  # noqa: PLC0415  (only writers need it)

  workdir = Path(workdir)
  params = unstacked_params(params)
  spec = dataclasses.replace(spec, model=spec.model.replace(scan_layers=False))
  final = workdir / MODEL_DIRNAME
  tmp = workdir / f".{MODEL_DIRNAME}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    save_file({name: np.ascontiguousarray(value) for name, value in params.items()},
              str(tmp / PARAMS_FILENAME))
    shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILENAME)
    meta = {"format": FORMAT_VERSION, **spec.to_dict(), **info,
            "params_sha256": sha256(tmp / PARAMS_FILENAME),
            "tokenizer_sha256": sha256(tmp / TOKENIZER_FILENAME)}
    (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")
    aside = workdir / f".{MODEL_DIRNAME}.old-{os.getpid()}"
    if final.exists():
      os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def read_model(workdir: Path) -> tuple[RunSpec, FlatParams, Path, dict[str, Any]]:
  """(spec, parameters, tokenizer file, model.json) of WORKDIR/model, each file checked against
  the SHA-256 that model.json recorded: a damaged or edited export is refused, named."""
  from safetensors import SafetensorError  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  folder = Path(workdir) / MODEL_DIRNAME
  if not (folder / META_FILENAME).is_file():
    raise FileNotFoundError(f"no exported model in {folder}: train the run to its end (it "
                            "writes one), export one with `python -m transformer.evaluate "
                            "--workdir DIR --export`, or pick a checkpoint with --step N")
  meta = read_json(folder / META_FILENAME)
  spec = RunSpec.from_dict(meta, folder / META_FILENAME)
  for name, key in ((PARAMS_FILENAME, "params_sha256"), (TOKENIZER_FILENAME, "tokenizer_sha256")):
    path = folder / name
    if not path.is_file():
      raise FileNotFoundError(f"{path} is missing: export the model again")
    if meta.get(key) != sha256(path):
      raise ValueError(f"{path} does not match the checksum in {folder / META_FILENAME}: the "
                       "file is damaged or was changed; export the model again")
  try:
    params = load_file(str(folder / PARAMS_FILENAME))
  except (SafetensorError, OSError) as error:
    raise ValueError(f"{folder / PARAMS_FILENAME} cannot be read ({error})") from None
  return spec, params, folder / TOKENIZER_FILENAME, meta
