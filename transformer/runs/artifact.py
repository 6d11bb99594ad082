"""A run's final model as one folder, WORKDIR/model/, that translation, evaluation, inspection and
warm starts load by default: the parameters that were scored, with what it takes to use them.

  params.safetensors   every parameter by name ("decoder/layers/0/self_attention/query"), in
                       its stored dtype: readable without this package (safetensors, NumPy);
                       always per layer, also from a run with stacked layers (model.scan_layers,
                       written as the unrolled model it equals)
  spm.model            the tokenizer: a SentencePiece model, or vocab.json for a char or byte
                       vocabulary (model.json's "tokenizer_file" names which; none: spm.model)
  model.json           format version, task, model configuration, sequence limit, the search
                       settings it was scored with, which checkpoints were averaged, the scores,
                       the SHA-256 of the two files above, and a SHA-256 of its own other fields

The folder is written complete under a temporary name and then renamed into place; an older one
is renamed aside first and removed after, so WORKDIR/model is never a half-written mix. Every
file is checked against its SHA-256 when the folder is read: a damaged or hand-edited file is
refused by name. The hashes sit beside what they cover, so they catch accidents, not tampering:
what protects a reader from a folder made to harm it is that every field of model.json must fit
its schema and every size it names must match the parameter file's own header before anything
is allocated (`check_header`), and that the parameters must be finite floating-point numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transformer.config import CONFIG_FILENAME, read_config, read_json
from transformer.data.tokenizer import TOKENIZER_FILENAMES
from transformer.errors import MissingFile, UserError
from transformer.model.stacking import unstacked_params
from transformer.runs.params import FlatParams, difference, model_shapes
from transformer.runs.spec import RunSpec

MODEL_DIRNAME = "model"
PARAMS_FILENAME = "params.safetensors"
TOKENIZER_FILENAME = "spm.model"  # the tokenizer file of exports that do not name theirs
META_FILENAME = "model.json"
# 1: no search settings, no self-hash (still read); 2: both.
FORMAT_VERSION = 2
SELF_HASH_KEY = "model_json_sha256"
# model.json's schema: each top-level field, the types it may hold, and whether it is required
# (by format 2; format 1 lacked the search settings and the self-hash). Anything else is refused:
# a reader must not act on a field nobody wrote.
_INT, _STR, _DICT = (int,), (str,), (dict,)
SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
  "format": (_INT, True),
  "task": (_STR, True),
  "model": (_DICT, True),
  "data_max_len": (_INT, True),
  "decode": (_DICT, True),
  "params_sha256": (_STR, True),
  "tokenizer_sha256": (_STR, True),
  SELF_HASH_KEY: (_STR, True),
  "step": ((int, type(None)), False),
  "averaged_steps": ((list,), False),
  "exported_by": (_STR, False),
  "source": (_STR, False),
  "scores": (_DICT, False),
  "tokenizer_file": (_STR, False),  # a char or byte vocabulary's vocab.json; none: spm.model
  "running_text": ((bool,), False),  # only when true: a language model of running text
}
ADDED_IN_FORMAT_2 = ("decode", SELF_HASH_KEY)
# Parameter dtypes a model file may hold: a model's parameters are floating-point numbers.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


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
  # (a path that is not UTF-8, e.g. in "source", is hashed as its bytes)
  return hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
  meta = {**{k: v for k, v in meta.items() if k != SELF_HASH_KEY}, SELF_HASH_KEY: ""}
  meta[SELF_HASH_KEY] = _self_hash(meta)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")  # \u-escaped: any path
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def export_model(
  workdir: Path,
  spec: RunSpec,
  params: FlatParams,
  tokenizer_path: Path,
  info: dict[str, Any],
  *,
  keep_scores: bool = False,
) -> Path:
  """Writes WORKDIR/model/ (see the module docstring); `info` joins model.json (the step, the
  averaged checkpoints, scores). With `keep_scores`, the scores the replaced model.json recorded
  are kept if it describes these very parameters (`previous_scores`), info's scores merged over
  them set by set; scores of other parameters are never carried over."""
  from safetensors.numpy import save_file

  workdir = Path(workdir)
  params = unstacked_params(params)
  spec = dataclasses.replace(spec, model=spec.model.replace(scan_layers=False))
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
    if keep_scores:
      meta["scores"] = merged_scores(previous_scores(final / META_FILENAME, meta), meta)
    _write_meta(tmp / META_FILENAME, meta)
    replace_folder(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def replace_folder(tmp: Path, final: Path) -> None:
  """Renames the complete folder `tmp` to `final`; a folder already there is renamed aside
  first and removed after, so `final` is always the old folder or the new one, whole."""
  aside = final.with_name(f".{final.name}.old-{os.getpid()}")
  shutil.rmtree(aside, ignore_errors=True)
  with _signals_held():  # a Ctrl-C or SIGTERM between the two renames would leave neither
    if final.exists():
      os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


# What must be equal for two model.json to describe the same parameters (their scores hold for
# both): the same model, the same parameter bytes, the same tokenizer.
_SAME_MODEL_KEYS = ("task", "model", "params_sha256", "tokenizer_sha256")


def previous_scores(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
  """The scores of the model.json at `path` if it describes the parameters `meta` does, else
  none (also when it is missing or unreadable: nothing it says can be trusted then)."""
  try:
    previous = read_meta(path)
  except (OSError, ValueError):  # absent, damaged, edited: its scores are not kept
    return {}
  if any(_as_json(previous.get(key)) != _as_json(meta.get(key)) for key in _SAME_MODEL_KEYS):
    return {}
  return previous.get("scores", {})


def _as_json(value: Any) -> Any:
  """`value` as model.json reads it back (a tuple as a list): what two of them compare."""
  return json.loads(json.dumps(value))


def merged_scores(kept: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
  """`kept` with meta's own scores over them, set by set (a new BLEU of the test set keeps the
  validation loss training recorded)."""
  new = meta.get("scores", {})
  return {name: {**kept.get(name, {}), **new.get(name, {})} for name in {**kept, **new}}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
  """SIGINT and SIGTERM wait until the block is done (their handlers then run as usual)."""
  held = {signal.SIGINT, signal.SIGTERM}
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
  if type(version) is not int or version not in (1, FORMAT_VERSION):
    raise UserError(
      f"{path} is of format {version!r}, which this version of the package does not read "
      f"(it reads 1 and {FORMAT_VERSION}): export the model again with this version"
    )
  if version >= 2 and meta.get(SELF_HASH_KEY) != _self_hash(meta):
    raise UserError(
      f"{path} does not match its own checksum: the file is damaged or was edited; export "
      "the model again (python -m transformer.evaluate --workdir DIR --export)"
    )
  problem = _schema_problem(meta)
  if problem:
    raise UserError(
      f"{path} {problem}: it is not a model.json this package wrote; restore the file from "
      "the run, or export the model again"
    )
  return meta


def _schema_problem(meta: dict[str, Any]) -> str | None:
  """What in `meta` breaks the schema (`SCHEMA`), in words; None if nothing does."""
  unknown = sorted(set(meta) - set(SCHEMA))
  if unknown:
    return f"has a field {unknown[0]!r} that model.json does not have"
  for key, (types, required) in SCHEMA.items():
    if key not in meta:
      if required and (meta["format"] >= 2 or key not in ADDED_IN_FORMAT_2):
        return f"lacks the field {key!r}"
      continue
    value = meta[key]
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
      return f"has {key}={value!r}, which is not of type {' or '.join(t.__name__ for t in types)}"
  if not all(type(s) is int and s >= 0 for s in meta.get("averaged_steps", [])):
    return f"has averaged_steps={meta['averaged_steps']!r}, which is not a list of steps"
  return None


Header = dict[str, tuple[tuple[int, ...], str]]  # {name: (shape, safetensors dtype)}


def read_header(path: Path) -> Header:
  """The parameter file's names, shapes and dtypes, read from its header without its data."""
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(str(path), "numpy") as f:
      slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
      return {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
  except (SafetensorError, OSError) as error:
    raise UserError(f"{path} cannot be read ({error}): export the model again") from None


def check_sizes(
  spec: RunSpec, header: Header, path: Path, described_by: Path | None = None
) -> None:
  """Refuses sizes in model.json (or `described_by`, the file the sizes came from) beyond what
  the parameters in `path` could hold, before a model of them is even traced: every width at
  most the largest dimension, every layer count at most the tensor count, and a sinusoidal
  position table (built while translating, not stored) of at most 16 times the values."""
  config = spec.model
  described_by = described_by or path.parent / META_FILENAME
  largest = max((max(shape, default=1) for shape, _ in header.values()), default=0)
  values = sum(math.prod(shape) for shape, _ in header.values())
  limits = dict.fromkeys(("vocab_size", "d_model", "d_ff", "num_heads"), largest)
  # Layers are tensors of their own, or one dimension of stacked tensors (scanned layers).
  limits |= dict.fromkeys(("num_encoder_layers", "num_decoder_layers"), len(header) + largest)
  for name, limit in limits.items():
    if getattr(config, name) > limit:
      raise UserError(
        f"{described_by} gives model.{name}={getattr(config, name)}, more than {path} can "
        "hold: the two do not belong together (restore the file from the run)"
      )
  if config.position == "sinusoidal" and config.max_len * config.d_model > max(
    16 * values, 1 << 22
  ):
    raise UserError(
      f"{described_by} gives model.max_len={config.max_len}, a position table far larger "
      f"than the model in {path}: restore the file from the run"
    )


def check_header(path: Path, header: Header, wanted: dict[str, tuple[int, ...]]) -> None:
  """Refuses a parameter file whose header is not exactly the parameters `wanted` ({name:
  shape}, of the model that model.json describes) in a floating-point dtype. Run before the
  file's data is loaded or the model is built."""
  shapes = {name: _Shape(shape) for name, (shape, _) in header.items()}
  problem = difference(wanted, shapes)
  if problem:
    raise UserError(
      f"{path} does not fit the model that {path.parent / META_FILENAME} describes: {problem}; "
      "the two files are not of one export (export the model again)"
    )
  odd = sorted(name for name, (_, dtype) in header.items() if dtype not in FLOAT_DTYPES)
  if odd:
    raise UserError(
      f"{path}: parameter {odd[0]} is of dtype {header[odd[0]][1]}, not a floating-point type "
      f"({len(odd)} in all): the file was not written by an export; export the model again"
    )


@dataclasses.dataclass(frozen=True)
class _Shape:
  """A parameter known only by its shape (what `difference` compares)."""

  shape: tuple[int, ...]


def check_finite(path: Path, params: FlatParams) -> None:
  """Refuses parameters holding NaN or infinity: a model of them translates into garbage."""
  bad = sorted(name for name, value in params.items() if not np.isfinite(value).all())
  if bad:
    raise UserError(
      f"{path}: parameter {bad[0]} holds NaN or infinite values ({len(bad)} in all): the "
      "model cannot be used; export it again from a good checkpoint"
    )


# The folders of a workdir that training and `evaluate --export` manage as a whole: a result
# written into one is ignored with a warning by every later load (checkpoints/) or deleted by
# the next export (model/).
MANAGED_DIRNAMES = (MODEL_DIRNAME, "checkpoints")


def check_out_not_managed(out: Path, workdir: Path, default: str) -> None:
  """Refuses an --out that is, or lies inside, the run's model/ or checkpoints/ (`default`: the
  folder of the workdir the command writes when --out is not given)."""
  target, run = Path(out).absolute().resolve(), Path(workdir).absolute().resolve()
  for name in MANAGED_DIRNAMES:
    kept = run / name
    if target == kept or kept in target.parents:
      raise UserError(
        f"--out {out} lies in {kept}, which the run manages as a whole (an export replaces "
        f"model/, a load warns of anything else in checkpoints/): give another folder, e.g. "
        f"{run / default}"
      )


def read_model(workdir: Path) -> tuple[RunSpec, FlatParams, Path, dict[str, Any]]:
  """(spec, parameters, tokenizer file, model.json) of WORKDIR/model, each file checked against
  the SHA-256 that model.json recorded: a damaged or edited export is refused, named."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  folder = Path(workdir) / MODEL_DIRNAME
  if not (folder / META_FILENAME).is_file() and (Path(workdir) / META_FILENAME).is_file():
    raise UserError(
      f"{workdir} is an exported model folder, not a run directory: give the run directory "
      f"that holds it, --workdir {Path(workdir).parent}"
    )
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
  # Sizes and dtypes from the file's header first: nothing is allocated for a model.json
  # that does not describe this file.
  header = read_header(folder / PARAMS_FILENAME)
  check_sizes(spec, header, folder / PARAMS_FILENAME)
  check_header(folder / PARAMS_FILENAME, header, model_shapes(spec.task, spec.model))
  try:
    params = load_file(str(folder / PARAMS_FILENAME))
  except (SafetensorError, OSError) as error:
    raise UserError(f"{folder / PARAMS_FILENAME} cannot be read ({error})") from None
  check_finite(folder / PARAMS_FILENAME, params)
  return spec, params, folder / tokenizer_name, meta
