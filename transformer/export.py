"""`python -m transformer.export --workdir DIR --format huggingface|ctranslate2 --out OUT` (also
`transformer-export`): a trained translation run as a model the usual serving engines load.

  huggingface   a MarianMT folder: config.json, generation_config.json, model.safetensors, and
                the tokenizer (source.spm = target.spm = the run's SentencePiece model, vocab.json).
                Written with NumPy and safetensors only; `MarianMTModel.from_pretrained(OUT)` and
                `MarianTokenizer.from_pretrained(OUT)` load it.
  ctranslate2   that folder converted by CTranslate2's own converter (`TransformersConverter`);
                needs the `export` extra (ctranslate2, transformers, torch).

Only the paper's architecture maps onto these formats: a post-norm encoder-decoder with sinusoidal
positions, ReLU, one embedding table shared by source, target and the output layer. Anything else
is refused in one line naming what does not fit.

Two differences are bridged exactly rather than approximated:
  * Positions. Marian's sinusoids put all sines in the first half of D and the cosines in the
    second; ours interleave them (sin at even, cos at odd dimensions). Marian computes its table
    itself at load time, so the weights are written in a permuted basis of D instead: every
    D-sized axis is reordered by `hidden_order`, which turns our table into Marian's. A network
    whose residual stream is permuted consistently computes the same logits (LayerNorm's mean and
    variance do not depend on the order; the tied output layer reads the permuted embedding).
  * The decoder's first input. Ours is BOS's own embedding (plus position 0); CTranslate2's Marian
    loader starts from a zero vector instead, so the conversion runs with that loader told to
    start from BOS (`_bos_start_loader`), as its BART loader does.

One is not: Marian's LayerNorms use PyTorch's epsilon 1e-5, ours `model.layer_norm_epsilon`
(1e-6 by default). The logits then differ by about 1e-5 (tests/test_export.py bounds them by
1e-4). CTranslate2 reads the epsilon from its own config, which the conversion sets to ours.

OUT is written whole or not at all: into a temporary folder beside it, renamed into place when
complete (a previous export there is replaced only then; a failure, a full disk included, removes
the temporary folder and leaves OUT as it was). Each export carries `transformer-export.json`
(its format and the files it wrote), by which a later export recognises its own folder: OUT must
be absent, an empty folder, or a previous export of the same format holding nothing else. It may
not be the run's workdir, nor lie inside a folder the run keeps there (model/, checkpoints/, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transformer.cli import ArgumentParser, positive_int, run_cli, storage_full
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.errors import UserError
from transformer.model.config import TransformerConfig
from transformer.runs.artifact import replace_folder
from transformer.runs.params import FlatParams

log = logging.getLogger(__name__)

FORMATS = ("huggingface", "ctranslate2")
# The file in every export that names its format and files: how an export knows its own folder.
MARKER_FILENAME = "transformer-export.json"
# What the formats express, as (field, value): anything else is refused by `check_exportable`.
_REQUIRED = (
  ("norm", "post"),
  ("position", "sinusoidal"),
  ("activation", "relu"),
  ("share_embeddings", True),
  ("tie_output", True),
  ("pad_id", PAD_ID),
  ("use_bias", True),
)


def check_exportable(task: str, config: TransformerConfig) -> None:
  """A one-line ValueError naming the first setting these formats cannot express."""
  if task != "translation":
    raise UserError(f"a {task!r} run cannot be exported: MarianMT is a translation model")
  for field, wanted in _REQUIRED:
    value = getattr(config, field)
    if value != wanted:
      raise UserError(
        f"model.{field}={value!r} does not fit MarianMT / CTranslate2 (they need {wanted!r}): "
        "only the paper's post-norm encoder-decoder with sinusoidal positions, ReLU and one "
        "shared, tied embedding table can be exported"
      )
  if config.d_model % 2:
    raise UserError(f"model.d_model={config.d_model} is odd: sinusoidal positions need it even")


def hidden_order(d_model: int) -> np.ndarray:
  """Marian's dimension i is our dimension order[i]: our sines (even dimensions), then our
  cosines (odd ones)."""
  return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def _attention(params: FlatParams, scope: str, order: np.ndarray) -> dict[str, np.ndarray]:
  """q/k/v/out projections of one attention block as torch Linear weights ([out, in])."""
  out = {}
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    kernel_DNH = params[f"{scope}/{ours}"]
    kernel_DX = kernel_DNH.reshape(kernel_DNH.shape[0], -1)[order]
    out[f"{theirs}.weight"] = kernel_DX.T
    out[f"{theirs}.bias"] = params[f"{scope}/{ours}_bias"].reshape(-1)
  kernel_NHD = params[f"{scope}/out"]
  out["out_proj.weight"] = kernel_NHD.reshape(-1, kernel_NHD.shape[-1])[:, order].T
  out["out_proj.bias"] = params[f"{scope}/out_bias"][order]
  return out


def _norm(params: FlatParams, scope: str, order: np.ndarray) -> dict[str, np.ndarray]:
  return {
    "weight": params[f"{scope}/norm/scale"][order],
    "bias": params[f"{scope}/norm/bias"][order],
  }


def _feed_forward(params: FlatParams, scope: str, order: np.ndarray) -> dict[str, np.ndarray]:
  return {
    "fc1.weight": params[f"{scope}/wi"][order].T,
    "fc1.bias": params[f"{scope}/bi"],
    "fc2.weight": params[f"{scope}/wo"][:, order].T,
    "fc2.bias": params[f"{scope}/bo"][order],
  }


def _prefixed(prefix: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {f"{prefix}.{name}": value for name, value in tensors.items()}


def marian_state_dict(params: FlatParams, config: TransformerConfig) -> dict[str, np.ndarray]:
  """The parameters by MarianMTModel's names, float32, in Marian's basis of D (module docstring);
  the tied copies of the embedding are left out, as `save_pretrained` leaves them out."""
  params = {name: np.asarray(value, np.float32) for name, value in params.items()}
  order = hidden_order(config.d_model)
  (table_name,) = [name for name in params if name.endswith("embed/table")]
  out = {
    "model.shared.weight": params[table_name][:, order],
    "final_logits_bias": np.zeros((1, config.vocab_size), np.float32),
  }
  for i in range(config.num_encoder_layers):
    ours, theirs = f"encoder/layers/{i}", f"model.encoder.layers.{i}"
    out |= _prefixed(f"{theirs}.self_attn", _attention(params, f"{ours}/self_attention", order))
    out |= _prefixed(
      f"{theirs}.self_attn_layer_norm", _norm(params, f"{ours}/attention_block", order)
    )
    out |= _prefixed(theirs, _feed_forward(params, f"{ours}/feed_forward", order))
    out |= _prefixed(
      f"{theirs}.final_layer_norm", _norm(params, f"{ours}/feed_forward_block", order)
    )
  for i in range(config.num_decoder_layers):
    ours, theirs = f"decoder/layers/{i}", f"model.decoder.layers.{i}"
    out |= _prefixed(f"{theirs}.self_attn", _attention(params, f"{ours}/self_attention", order))
    out |= _prefixed(
      f"{theirs}.self_attn_layer_norm", _norm(params, f"{ours}/self_attention_block", order)
    )
    out |= _prefixed(f"{theirs}.encoder_attn", _attention(params, f"{ours}/cross_attention", order))
    out |= _prefixed(
      f"{theirs}.encoder_attn_layer_norm", _norm(params, f"{ours}/cross_attention_block", order)
    )
    out |= _prefixed(theirs, _feed_forward(params, f"{ours}/feed_forward", order))
    out |= _prefixed(
      f"{theirs}.final_layer_norm", _norm(params, f"{ours}/feed_forward_block", order)
    )
  return {name: np.ascontiguousarray(value) for name, value in out.items()}


def marian_config(config: TransformerConfig) -> dict[str, Any]:
  """config.json of the MarianMTModel; `layer_norm_eps` is ours, recorded for the CTranslate2
  conversion (Marian itself always uses 1e-5)."""
  return {
    "architectures": ["MarianMTModel"],
    "model_type": "marian",
    "vocab_size": config.vocab_size,
    "decoder_vocab_size": config.vocab_size,
    "d_model": config.d_model,
    "encoder_layers": config.num_encoder_layers,
    "decoder_layers": config.num_decoder_layers,
    "encoder_attention_heads": config.num_heads,
    "decoder_attention_heads": config.num_heads,
    "encoder_ffn_dim": config.d_ff,
    "decoder_ffn_dim": config.d_ff,
    "activation_function": "relu",
    "max_position_embeddings": config.max_len,
    "scale_embedding": True,
    "share_encoder_decoder_embeddings": True,
    "tie_word_embeddings": True,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "is_encoder_decoder": True,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "decoder_start_token_id": BOS_ID,
    "forced_eos_token_id": None,
    "dtype": "float32",
    "layer_norm_eps": config.layer_norm_epsilon,
  }


def generation_config(beam_size: int, max_len: int) -> dict[str, Any]:
  """generation_config.json: the run's beam size, BOS as the decoder's first input, PAD never
  generated. (Hugging Face divides by |Y|^alpha, not GNMT's penalty, so no alpha is carried.)"""
  return {
    "bos_token_id": BOS_ID,
    "decoder_start_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "num_beams": beam_size,
    "max_length": max_len,
    "bad_words_ids": [[PAD_ID]],
  }


def _write_json(path: Path, values: dict[str, Any]) -> None:
  path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_huggingface(
  out: Path,
  config: TransformerConfig,
  params: FlatParams,
  tokenizer_path: Path,
  *,
  beam_size: int,
  source_lang: str = "en",
  target_lang: str = "de",
) -> Path:
  """Writes the MarianMT folder `out` (see the module docstring); returns it."""
  import sentencepiece  # a dependency, imported where it is used
  from safetensors.numpy import save_file

  processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
  if processor.get_piece_size() != config.vocab_size:
    raise UserError(
      f"{tokenizer_path} has {processor.get_piece_size()} pieces but the model "
      f"{config.vocab_size}: export the run's own tokenizer"
    )
  pieces = [processor.id_to_piece(i) for i in range(config.vocab_size)]
  out.mkdir(parents=True, exist_ok=True)
  save_file(marian_state_dict(params, config), str(out / "model.safetensors"), {"format": "pt"})
  os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600: readable as the rest
  _write_json(out / "config.json", marian_config(config))
  _write_json(out / "generation_config.json", generation_config(beam_size, config.max_len))
  for name in ("source.spm", "target.spm"):
    shutil.copyfile(tokenizer_path, out / name)
  _write_json(out / "vocab.json", {piece: i for i, piece in enumerate(pieces)})
  special = {
    "eos_token": pieces[EOS_ID],
    "unk_token": pieces[UNK_ID],
    "pad_token": pieces[PAD_ID],
  }
  _write_json(out / "special_tokens_map.json", special)
  _write_json(
    out / "tokenizer_config.json",
    {
      "tokenizer_class": "MarianTokenizer",
      "source_lang": source_lang,
      "target_lang": target_lang,
      "separate_vocabs": False,
      "model_max_length": config.max_len,
      **special,
    },
  )
  return out


@contextlib.contextmanager
def _bos_start_loader() -> Iterator[None]:
  """CTranslate2's MarianMT loader, replaced while converting by its BART loader with Marian's
  settings: the decoder then starts from the embedding of `decoder_start_token_id` (BOS, as
  ours does; the MarianMT loader starts from a zero vector and drops a trailing <pad> piece that
  our vocabulary does not have), with our LayerNorm epsilon."""
  from ctranslate2.converters import transformers as ct2

  class BosStartMarianLoader(ct2.BartLoader):
    @property
    def architecture_name(self):
      return "MarianMTModel"

    def get_model_spec(self, model):
      model.config.normalize_before = False  # post-norm
      model.config.normalize_embedding = False  # no LayerNorm on the embeddings
      return super().get_model_spec(model)

    def set_config(self, config, model, tokenizer):
      super().set_config(config, model, tokenizer)
      config.bos_token = config.decoder_start_token
      config.layer_norm_epsilon = float(getattr(model.config, "layer_norm_eps", 1e-5))

  saved = ct2._MODEL_LOADERS["MarianConfig"]
  ct2._MODEL_LOADERS["MarianConfig"] = BosStartMarianLoader()
  try:
    yield
  finally:
    ct2._MODEL_LOADERS["MarianConfig"] = saved


def write_ctranslate2(out: Path, huggingface_dir: Path, *, quantization: str | None = None) -> Path:
  """Converts the MarianMT folder with CTranslate2's `TransformersConverter` into `out`, the
  SentencePiece model copied beside it; returns `out`."""
  try:
    from ctranslate2.converters import TransformersConverter
  except ImportError:
    raise UserError(
      "--format ctranslate2 needs ctranslate2, transformers and torch: "
      'pip install "transformer[export]"'
    ) from None
  with _bos_start_loader():
    converter = TransformersConverter(str(huggingface_dir), copy_files=["source.spm"])
    converter.convert(str(out), quantization=quantization, force=True)
  shutil.move(out / "source.spm", out / "spm.model")
  return out


def export(
  workdir: str | Path,
  fmt: str,
  out: str | Path,
  *,
  step: int | None = None,
  average: int | None = None,
) -> Path:
  """Writes a run's model (its export, or checkpoint `step`, or the mean of the newest `average`)
  in format `fmt` to `out`, whole or not at all; returns `out`."""
  from transformer.runs.loading import load_run
  from transformer.runs.params import model_params

  if fmt not in FORMATS:
    raise UserError(f"--format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
  workdir, out = Path(workdir), Path(out)
  check_out(out, workdir, fmt)  # before the run is loaded: a refused --out costs nothing
  loaded = load_run(workdir, step=step, average=average)
  check_exportable(loaded.spec.task, loaded.spec.model)
  params = model_params(loaded.model)
  beam_size = loaded.spec.search.beam_size

  def write(folder: Path, scratch: Path) -> None:
    hf_dir = folder if fmt == "huggingface" else scratch
    write_huggingface(
      hf_dir, loaded.spec.model, params, loaded.tokenizer.model_path, beam_size=beam_size
    )
    if fmt == "ctranslate2":
      write_ctranslate2(folder, hf_dir)

  write_whole(out, fmt, write)
  return out


def write_whole(out: Path, fmt: str, write: Callable[[Path, Path], None]) -> None:
  """Runs `write(folder, scratch)` into a temporary folder beside `out` (and a scratch folder
  beside it, for the MarianMT folder a conversion starts from), marks it as an export of `fmt`
  and renames it to `out`, replacing a previous export only now that the new one is whole.
  Anything that fails removes both; a full disk, or a folder that refuses the writes, is one
  line naming --out (not the run's folders: --out is all this command writes)."""
  final = out.resolve()
  tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
  scratch = final.with_name(f".{final.name}.marian-{os.getpid()}")
  problem = None
  try:
    _remove(tmp, scratch)  # what an export killed under this process id left
    final.parent.mkdir(parents=True, exist_ok=True)
    write(tmp, scratch)
    names = sorted(path.name for path in tmp.iterdir())
    _write_json(tmp / MARKER_FILENAME, {"format": fmt, "files": names})
    replace_folder(tmp, final)
  except Exception as error:
    problem = _write_problem(error, final.parent)
    if problem is None:
      raise
  finally:
    _remove(tmp, scratch)
  if problem is not None:
    # Raised outside the handler, so that the OS error is not its context: `run_cli` would find
    # the full disk there and advise freeing space under --workdir instead.
    raise UserError(f"--out {out} cannot be written ({problem}): {_remedy(problem)}")


def _remove(*folders: Path) -> None:
  for folder in folders:
    shutil.rmtree(folder, ignore_errors=True)


# A full disk in the export's own words: `run_cli` takes the OS's words ("No space left on
# device") anywhere in a message for a full workdir.
_STORAGE_WORDS = {
  errno.ENOSPC: "its disk is full",
  errno.EDQUOT: "its disk quota is used up",
  errno.EFBIG: "a file would exceed the file-size limit",
}


def _write_problem(error: Exception, where: Path) -> str | None:
  """What kept the export from being written into the folder `where`, in words; None for
  anything else (a bug, or a file the export reads: those keep their own words)."""
  if storage_full(error):
    for code, words in _STORAGE_WORDS.items():
      if getattr(error, "errno", None) == code or os.strerror(code) in str(error):
        return words
    return _STORAGE_WORDS[errno.ENOSPC]
  if isinstance(error, OSError) and error.strerror and isinstance(error.filename, (str, bytes)):
    written = Path(os.fsdecode(error.filename))
    if written == where or where in written.parents:  # a folder that refuses the writes
      return error.strerror.lower()
  return None


def _remedy(problem: str) -> str:
  if problem in _STORAGE_WORDS.values():
    return "free space there or give another --out; nothing was written"
  return "give a folder you can write to; nothing was written"


def check_out(out: Path, workdir: Path, fmt: str) -> None:
  """Refuses an --out that the export would write over something not its own: the run's
  workdir (its config.json is the run's record), a path inside a folder or file the run keeps
  there, a file, or a non-empty folder that is not a previous export of `fmt`."""
  target, run = out.resolve(), workdir.resolve()
  if target == run:
    raise UserError(
      f"--out {out} is the run's workdir: the export would overwrite the run's own files "
      f"(config.json); give a folder of its own, e.g. --out {run / fmt}"
    )
  if run in target.parents:
    kept = run / target.relative_to(run).parts[0]
    if kept != target and kept.exists():
      raise UserError(
        f"--out {out} lies inside {kept}, which the run keeps: give a folder of its own, "
        f"e.g. --out {run / fmt}"
      )
  _check_replaceable(out, target, fmt)


def _check_replaceable(out: Path, target: Path, fmt: str) -> None:
  """`target` must be absent, an empty folder or a previous export of `fmt` with nothing
  added (what it holds is deleted when it is replaced)."""
  if not target.exists():
    above = next(folder for folder in target.parents if folder.exists())  # "/" at the latest
    if not above.is_dir():
      raise UserError(f"--out {out} lies under {above}, which is a file: give a folder")
    return
  if not target.is_dir():
    raise UserError(f"--out {out} is a file: give a folder (made if absent)")
  names = sorted(path.name for path in target.iterdir())
  if not names or _is_export(target, fmt, names):
    return
  raise UserError(
    f"--out {out} holds files that are not a {fmt} export of this package ({names[0]}, "
    f"{len(names)} in all) and would be replaced: give a new or empty folder, or empty it first"
  )


def _is_export(folder: Path, fmt: str, names: list[str]) -> bool:
  """Whether `folder` (holding `names`) is an export of `fmt` as this command writes it: its
  marker names that format, and every file there is one it lists."""
  try:
    marker = json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # no marker: not ours
    return False
  if not isinstance(marker, dict) or marker.get("format") != fmt:
    return False
  listed = marker.get("files")
  return isinstance(listed, list) and set(names) <= {*listed, MARKER_FILENAME}


def parse_args(argv=None) -> argparse.Namespace:
  parser = ArgumentParser(
    prog="python -m transformer.export",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--workdir", required=True, help="a translation run written by training")
  parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
  parser.add_argument("--out", required=True, help="the folder to write (made if absent)")
  parser.add_argument("--step", type=positive_int, help="use checkpoint STEP")
  parser.add_argument(
    "--average", type=positive_int, help="use the mean of the newest K checkpoints"
  )
  return parser.parse_args(argv)


def main(argv=None) -> Path:
  args = parse_args(argv)
  path = export(args.workdir, args.format, args.out, step=args.step, average=args.average)
  print(f"{args.format} model written to {path}")
  return path


def main_cli() -> int:
  """The `transformer-export` command: errors as one line and exit 2, no traceback."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  return run_cli(main, command=True)


if __name__ == "__main__":
  sys.exit(main_cli())
