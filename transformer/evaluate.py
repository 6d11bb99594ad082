"""`python -m transformer.evaluate --workdir DIR [--split test_2016 ...] [--src F --ref F]` (also
`transformer-evaluate`): scores a trained run again, nothing retrained.

The run's exported model by default (the one its training scored), or `--step N`, or the mean of
the newest `--average K` checkpoints; beam size, length penalty and length limit as the run was
configured unless given. Each set is translated in batches (each batch shape compiled once) and
scored with sacreBLEU (cased, detokenized, with its signature), the lowercased BLEU beside it, and
chrF. Hypotheses go to WORKDIR/evaluations/<set>.<settings>.txt, one line per source line, with
the scores in a .json beside them. `--export` writes the evaluated parameters as the run's model
(WORKDIR/model), e.g. an average chosen after training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import jax

from transformer import compilation_cache, files
from transformer.allocator import freeze_imported_objects, keep_freed_memory
from transformer.cli import (
  ArgumentParser,
  add_model_arguments,
  add_threads_argument,
  check_out_folder,
  positive_int,
  run_cli,
  use_cores,
)
from transformer.config import CONFIG_FILENAME, read_config
from transformer.data.config import FILE_DATASETS, DataConfig
from transformer.data.corpus import Corpus, Location, Pair
from transformer.data.inputs import EvaluationSource, Share, evaluation_sets, test_splits
from transformer.decode.config import DecodeConfig
from transformer.decode.scoring import score_test_sets
from transformer.errors import MissingFile, UserError
from transformer.parallel.config import ParallelConfig
from transformer.parallel.mesh import make_mesh
from transformer.runs.artifact import (
  META_FILENAME,
  MODEL_DIRNAME,
  check_out_not_managed,
  export_model,
  read_meta,
)
from transformer.runs.loading import LoadedRun, load_run
from transformer.runs.lock import WorkdirLock
from transformer.runs.params import model_params
from transformer.runs.spec import RunSpec
from transformer.runs.translator import check_32_bit_mode, check_beam_positions
from transformer.train.flops import available_memory_bytes

log = logging.getLogger(__name__)


def read_lines(path: Path, flag: str) -> list[str]:
  """The lines of a UTF-8 text file, or of a stream such as /dev/stdin, without their line ends
  and without a leading byte-order mark. Lines end at "\n" only, as the corpus reader splits
  them: a U+2028, a form feed or another break inside a sentence stays inside it, so the two
  files stay aligned."""
  if path.is_dir():
    raise UserError(f"{flag} {path} is a directory: give a text file, one sentence a line")
  if not path.exists():
    raise MissingFile(f"{flag} {path} does not exist: give an existing text file")
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as error:
    raise UserError(
      f"{path} is not UTF-8 ({error.reason} at byte {error.start}): convert it to UTF-8"
    ) from None
  lines = text.removeprefix("\ufeff").split("\n")
  if lines[-1] == "":
    lines.pop()  # the end of the last line, not a line of its own
  return [line.removesuffix("\r") for line in lines]


def read_pairs(src: str, ref: str) -> list[Pair]:
  """Aligned (source, reference) lines of two UTF-8 text files; at least one pair must have
  text on both sides (blank lines are kept: a blank source gets a blank translation)."""
  if _same_file(src, ref):  # (/dev/stdin twice reads a redirected file twice)
    raise UserError(
      f"--src {src} and --ref {ref} are the same file: the sources would be scored against "
      "themselves; give the references in a file of their own"
    )
  sides = [read_lines(Path(src), "--src"), read_lines(Path(ref), "--ref")]
  if len(sides[0]) != len(sides[1]):
    raise UserError(
      f"{src} has {len(sides[0])} lines but {ref} has {len(sides[1])}: the "
      "sources and references must be aligned line by line"
    )
  pairs = list(zip(*sides, strict=True))
  if not any(source.strip() and reference.strip() for source, reference in pairs):
    raise UserError(
      f"{src} and {ref} have no pair with text on both sides ({len(pairs)} lines): an "
      "evaluation of empty lines scores nothing; check the files"
    )
  return pairs


def _same_file(a: str, b: str) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:  # one is missing: read_lines names it
    return False


def parse_args(argv=None):
  parser = ArgumentParser(prog="python -m transformer.evaluate", description=__doc__)
  parser.add_argument("--workdir", required=True, help="a run directory written by training")
  parser.add_argument(
    "--split", nargs="*", help="splits of the run's dataset (default: its test splits)"
  )
  parser.add_argument("--src", help="a file of source sentences, one per line")
  parser.add_argument("--ref", help="the reference translations of --src, line by line")
  add_model_arguments(parser)
  parser.add_argument("--max_extra_tokens", type=int, help="(default: the run's)")
  parser.add_argument(
    "--batch_size",
    type=positive_int,
    help="sentences per batch (default: the run's data.eval_batch_size)",
  )
  add_threads_argument(parser)
  parser.add_argument("--out", help="where hypotheses and scores go (default: WORKDIR/evaluations)")
  parser.add_argument(
    "--export", action="store_true", help="also write the evaluated parameters as WORKDIR/model"
  )
  args = parser.parse_args(argv)
  if (args.src is None) != (args.ref is None):
    parser.error("--src and --ref go together: the sources and their references")
  if args.src and args.split:
    parser.error("give --split or --src/--ref, not both")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  use_cores(args.threads)
  workdir = Path(args.workdir).absolute()
  out = Path(args.out) if args.out else workdir / "evaluations"
  check_out_folder(out, "the hypotheses and scores")
  check_out_not_managed(out, workdir, "evaluations")
  compilation_cache.enable()
  keep_freed_memory()  # each decoding step's buffers without page faults
  freeze_imported_objects()
  with contextlib.ExitStack() as stack:
    if args.export and workdir.is_dir():  # it replaces WORKDIR/model: not under a running
      # train.py, nor under another export
      stack.enter_context(WorkdirLock(workdir, "exporting a model (transformer.evaluate)"))
    return _evaluate(args, workdir, out)


def _evaluate(args, workdir: Path, out: Path) -> dict:
  check_32_bit_mode()
  loaded = load_run(workdir, step=args.step, average=args.average)
  if loaded.spec.task != "translation":
    raise UserError(f"{workdir} holds a {loaded.spec.task!r} model: BLEU is for translation runs")
  # What the export will say the parameters are, known before the work (a bug shows at once).
  exported = exported_steps(workdir, args, loaded.steps) if args.export else {}
  data = _data_block(workdir, loaded.spec, need_splits=not args.src)
  decode = loaded.spec.search.overridden(
    beam_size=args.beam_size,
    alpha=args.alpha,
    max_extra_tokens=args.max_extra_tokens,
    stop=args.stop,
  )
  check_beam_positions(decode.beam_size, loaded.spec.model)
  mesh = make_mesh(ParallelConfig(data=-1))
  batch_size = args.batch_size or data.eval_batch_size
  step = decode.beam_size * loaded.spec.model.vocab_size * 4 * 2
  check_batch_memory(batch_size, data.max_len, step, "--batch_size")
  if batch_size % mesh.devices.size:
    raise UserError(
      f"--batch_size {batch_size} does not split over the {mesh.devices.size} "
      "devices: use a multiple of it"
    )
  sources: list[EvaluationSource] = (
    [(Path(args.src).name, read_pairs(args.src, args.ref))]
    if args.src
    else list(args.split or test_splits(data))
  )
  where = Location.of(data, workdir, jax.process_count())
  if not args.src:
    check_data_block(data, where, workdir / CONFIG_FILENAME)
  sets = evaluation_sets(
    data,
    where,
    sources,
    tokenizer=loaded.tokenizer,
    batch_size=batch_size,
    share=Share(jax.process_index(), jax.process_count()),
  )
  tag = _settings_tag(args, decode)
  report = score_test_sets(loaded.model, sets, loaded.tokenizer, decode, mesh, out_dir=None)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    for name, scores in report.items():
      hypotheses = scores.pop("hypotheses")
      files.write_text(out / f"{name}.{tag}.txt", "\n".join(hypotheses) + "\n")
      scores.update(model=loaded.source, batch_size=batch_size)
      files.write_text(out / f"{name}.{tag}.json", json.dumps(scores, indent=2, ensure_ascii=False))
      print(
        f"{name}: {scores['detail']}  (lowercased {scores['bleu_lowercased']:.2f}, chrF "
        f"{scores['chrf']:.2f}; {scores['signature']})"
      )
      print(f"  hypotheses: {out / f'{name}.{tag}.txt'}")
  if args.export:
    path = _export(workdir, loaded, exported, report)
    print(f"model written to {path}")
  return report


def _export(workdir: Path, loaded: LoadedRun, exported: dict, report: dict) -> Path:
  """Writes the evaluated parameters as WORKDIR/model with their steps and this evaluation's
  scores; the scores the replaced model.json holds are kept only if it is of the same
  parameters (an export exported again, or the checkpoint it was made of)."""
  info = {
    "source": loaded.source,
    **exported,
    "exported_by": "transformer.evaluate",
    "scores": recorded_scores(report),
  }
  params = model_params(loaded.model)
  return export_model(
    workdir, loaded.spec, params, loaded.tokenizer.model_path, info, keep_scores=True
  )


# The scores of a test set that model.json keeps: those training's finish records.
RECORDED = ("bleu", "bleu_lowercased", "chrf", "signature", "beam_size", "alpha")


def recorded_scores(report: dict) -> dict:
  """{set: its scores} as training records them in model.json."""
  return {name: {key: scores[key] for key in RECORDED} for name, scores in report.items()}


def exported_steps(workdir: Path, args, steps: list[int]) -> dict:
  """model.json's step and averaged_steps for the parameters evaluated, as training records
  them: checkpoint N is step N; an average is of its newest step, and lists the checkpoints it
  averaged (a damaged one is left out, so they are read from what was loaded); the export
  exported again keeps its own, and where it came from."""
  if args.step is not None:
    return {"step": args.step, "averaged_steps": []}
  if args.average is not None:
    return {"step": steps[-1], "averaged_steps": steps}
  meta = read_meta(workdir / MODEL_DIRNAME / META_FILENAME)
  kept = {"step": meta.get("step"), "averaged_steps": meta.get("averaged_steps", [])}
  return kept | ({"source": meta["source"]} if "source" in meta else {})


def check_batch_memory(rows: int, length: int, per_row_step: int, name: str) -> None:
  """Refuses an evaluation batch whose rows alone exceed the memory there is: a batch is padded
  to its full size even when the set is smaller (--batch_size 800000000 allocated for minutes
  before failing). Counted: each row's source and target ids (`length` each) and one search
  step's scores (`per_row_step` bytes: beam x vocabulary)."""
  available = available_memory_bytes()
  needed = rows * (length * 4 * 2 + per_row_step)
  if available is not None and needed > available:
    raise UserError(
      f"{name} {rows} needs {needed / 1e9:,.0f} GB for one batch, more than the "
      f"{available / 1e9:,.1f} GB available: lower it"
    )


def check_data_block(data: DataConfig, where: Location, config_path: Path) -> None:
  """What `--split` may make this command do, as a run's config.json (perhaps of a folder from
  elsewhere) directs it: read the shipped Multi30k corpus, Multi30k files of data.source_dir,
  or a tfds dataset already prepared on this machine, or the files of a "text" or "parallel"
  dataset, and write token caches into a cache folder
  that exists. It never downloads or prepares a tfds dataset, and never creates a folder that
  config.json names."""
  for key in ("cache_dir", "tfds_data_dir"):
    folder = getattr(data, key)
    if folder and not Path(folder).is_dir():
      raise UserError(
        f"{config_path} names data.{key}={folder!r}, which does not exist: evaluate creates "
        "no folder a run's config names; create it if the run is yours, or score files with "
        "--src/--ref"
      )
  if data.dataset == "multi30k" or data.dataset in FILE_DATASETS:  # read where they are
    return
  if ":" in data.dataset:  # a community dataset ("huggingface:..."): fetched from elsewhere
    raise UserError(
      f"{config_path} names the community dataset {data.dataset!r}: evaluate does not fetch "
      "datasets; score files with --src/--ref"
    )
  import tensorflow_datasets as tfds

  corpus = Corpus.of(data, where.cache_dir)
  assert isinstance(corpus, Corpus)  # file datasets returned above
  tfds_dir = corpus.tfds_dir
  try:
    prepared = tfds.builder(data.dataset, data_dir=str(tfds_dir)).is_prepared()
  except Exception:  # an unknown name, a folder tfds cannot read: nothing is prepared
    prepared = False
  if not prepared:
    raise UserError(
      f"{config_path} names the tfds dataset {data.dataset!r}, which is not prepared in "
      f"{tfds_dir}: evaluate does not download or prepare datasets; train on it first (which "
      "prepares it), or score files with --src/--ref"
    )


def _data_block(workdir: Path, spec: RunSpec, *, need_splits: bool) -> DataConfig:
  """The run's data block (its dataset's splits, its evaluation batches); an exported model
  alone, scored on files, gets the defaults with its own sequence limit."""
  if need_splits or (workdir / CONFIG_FILENAME).is_file():
    return read_config(workdir).data
  return DataConfig(max_len=spec.data_max_len, vocab_size=spec.model.vocab_size)


def _settings_tag(args, decode: DecodeConfig) -> str:
  """A file-name tag of what was evaluated: model, beam, alpha (and the stop rule where it is not
  the default: earlier files keep their names)."""
  model = f"step{args.step}" if args.step else f"avg{args.average}" if args.average else "model"
  stop = "" if decode.stop == DecodeConfig.stop else f".{decode.stop}"
  return f"{model}.beam{decode.beam_size}.alpha{decode.alpha:g}{stop}"


def main_cli() -> int:
  """The `transformer-evaluate` command: errors as one line and exit 2, no traceback."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  return run_cli(main, command=True)


if __name__ == "__main__":
  sys.exit(main_cli())
