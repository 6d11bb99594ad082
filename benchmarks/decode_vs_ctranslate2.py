"""Translating a test set with this project against CTranslate2 on the same weights (issue 28).

The run is converted with `transformer.export` (CTranslate2's own converter on the MarianMT
export). Each round translates the test set, text in and text out with the run's SentencePiece
model, with the project (`Translator.translate`, in this process) and with CTranslate2 float32
(a subprocess, `--ct2_python`, so that its threads are its own), beam search with the run's beam
size and alpha, then greedy, in turns: the machine's load changes between rounds alike for both,
and each round gives a paired ratio. Process CPU seconds are the steady measure on a shared
machine; wall seconds are recorded beside them. Both sides run warm (the project's programs
compiled, CTranslate2's model loaded and used once). CTranslate2 runs with each of
`--ct2_threads` intra-op threads (1 and 2) and is compared at its best: on a 2-core Intel Xeon its
OpenMP threads made 2 slower than 1 in CPU and in wall time (beam 8.4 against 4.5 CPU s, one
sentence 91 against 10 ms). The project runs as a user runs it, on every core (XLA's own thread
pool) or on `--threads N` of them (`translate --threads N`): run it once each way. Then
batch-1 latency: the first `--latency_n` sentences one at a time, median milliseconds. BLEU is
sacreBLEU as the project scores; "identical" counts lines equal to the project's own output.

CTranslate2 divides a finished hypothesis' log-probability by |Y|^alpha, the project by GNMT's
((5 + |Y|) / 6)^alpha, and stops a sentence once W hypotheses have finished, where the project
stops once no alive hypothesis can beat its best: their beam outputs differ on some lines; their
greedy outputs should not.

  python -m benchmarks.decode_vs_ctranslate2 --workdir runs/default [--ct2_python PY] [--threads 1]
  python -m benchmarks.decode_vs_ctranslate2 --preset quick   # a random tiny run, < 1 minute

The CTranslate2 side needs `ctranslate2` and `sentencepiece` in `--ct2_python` (default: this
Python); the conversion needs the `export` extra here, or an existing `--ct2_model`. Without
either the CTranslate2 rows are left out and the JSON says why.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "decode_vs_ctranslate2"
CORPUS = Path(__file__).resolve().parents[1] / "transformer" / "data" / "corpora" / "multi30k"


def test_set(split: str, limit: int | None) -> tuple[list[str], list[str]]:
  """(sources, references) of a shipped Multi30k test set, in file order."""
  sides = []
  for lang in ("en", "de"):
    with gzip.open(CORPUS / f"{split}_flickr.{lang}.gz", "rt", encoding="utf-8") as f:
      sides.append(f.read().splitlines()[:limit])
  return sides[0], sides[1]


# --------------------------------------------------------------------------- CTranslate2 worker
# Runs in --ct2_python: imports only ctranslate2, sentencepiece and the standard library.


def ct2_worker(request: dict) -> dict:
  import ctranslate2
  import sentencepiece

  if request.get("cores"):  # every core the benchmark had, whatever the project runs on
    os.sched_setaffinity(0, request["cores"])
  model = request["model"]
  processor = sentencepiece.SentencePieceProcessor(model_file=str(Path(model) / "spm.model"))
  translator = ctranslate2.Translator(
    model, device="cpu", compute_type="float32", intra_threads=request["threads"]
  )
  limit = request["max_len"]

  def translate(texts: list[str], beam: int) -> list[str]:
    # The project's source is its pieces + EOS; a transformers-converted model adds nothing.
    pieces = [p + ["</s>"] for p in processor.encode(texts, out_type=str)]
    results = translator.translate_batch(
      pieces,
      beam_size=beam,
      length_penalty=request["alpha"],
      max_batch_size=request["batch"],
      max_decoding_length=limit,
      max_input_length=limit,
      suppress_sequences=[["<pad>"]],
    )
    return processor.decode([r.hypotheses[0] for r in results])

  texts = request["texts"]
  translate(texts[:16], request["beam"])  # warm-up: threads and buffers
  if request["mode"] == "latency":
    times = []
    for text in texts:
      start = time.perf_counter()
      translate([text], request["beam"])
      times.append(time.perf_counter() - start)
    return {"median_ms": 1000 * statistics.median(times)}
  start, cpu = time.perf_counter(), time.process_time()
  hypotheses = translate(texts, request["beam"])
  return {
    "wall_s": time.perf_counter() - start,
    "cpu_s": time.process_time() - cpu,
    "hypotheses": hypotheses,
  }


def run_ct2(python: str, request: dict) -> dict:
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(request, f)
  try:
    out = subprocess.run(
      [python, __file__, "--ct2_worker", f.name],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, "OMP_NUM_THREADS": str(request["threads"])},
    ).stdout
  finally:
    os.unlink(f.name)
  return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- project side


def project_timed(translator, texts: list[str], beam: int, alpha: float) -> dict:
  start, cpu = time.perf_counter(), time.process_time()
  hypotheses = translator.translate(texts, beam_size=beam, alpha=alpha)
  return {
    "wall_s": time.perf_counter() - start,
    "cpu_s": time.process_time() - cpu,
    "hypotheses": hypotheses,
  }


def project_latency(translator, texts: list[str], beam: int, alpha: float) -> float:
  for text in texts:  # compiles each source length's programs once
    translator.translate([text], beam_size=beam, alpha=alpha)
  times = []
  for text in texts:
    start = time.perf_counter()
    translator.translate([text], beam_size=beam, alpha=alpha)
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def quick_run(directory: Path) -> Path:
  """A random tiny translation run (its exported model, config.json and a SentencePiece model
  of 300 sentence pairs), as training leaves one."""
  import dataclasses
  import shutil

  from flax import nnx

  from transformer import EncoderDecoder, TransformerConfig
  from transformer.data.multi30k import DEFAULT_SOURCE_DIR, read_lines
  from transformer.data.tokenizer import MODEL_FILENAME, Tokenizer, train_sentencepiece
  from transformer.runs.artifact import export_model
  from transformer.runs.params import model_params
  from transformer.runs.spec import RunSpec

  lines = read_lines(DEFAULT_SOURCE_DIR / "val.en.gz")[:300]
  lines += read_lines(DEFAULT_SOURCE_DIR / "val.de.gz")[:300]
  tokenizer = Tokenizer(train_sentencepiece(lines, directory / "spm" / MODEL_FILENAME, 250))
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=48)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  run = {"task": "translation", "model": dataclasses.asdict(config)}
  (directory / "config.json").write_text(json.dumps({**run, "data": {"max_len": 48}}))
  shutil.copy(tokenizer.model_path, directory / MODEL_FILENAME)
  spec = RunSpec("translation", config, 48)
  export_model(directory, spec, model_params(model), tokenizer.model_path, {"step": 0})
  return directory


def convert(workdir: Path, out: Path) -> tuple[Path | None, str | None]:
  """(CTranslate2 model, None), or (None, why not)."""
  try:
    import ctranslate2  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return None, "the export extra (ctranslate2, transformers, torch) is not installed here"
  from transformer.export import export

  return export(workdir, "ctranslate2", out), None


def bleu(hypotheses: list[str], references: list[str]) -> float:
  import sacrebleu

  return round(sacrebleu.BLEU().corpus_score(hypotheses, [references]).score, 2)


def main(argv=None):
  from benchmarks import common

  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument("--workdir", type=Path, help="a trained translation run")
  parser.add_argument("--split", default="test_2016")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--ct2_python", default=sys.executable)
  parser.add_argument("--ct2_model", type=Path, help="an existing conversion of the run")
  parser.add_argument("--ct2_batch", type=int, default=128, help="CTranslate2 max_batch_size")
  parser.add_argument(
    "--ct2_threads", default="1,2", help="CTranslate2 intra_threads to try, comma-separated"
  )
  parser.add_argument("--latency_n", type=int, default=50)
  parser.add_argument(
    "--threads",
    type=int,
    help="CPU cores the project computes on (its --threads; default: all of them)",
  )
  args = common.parse_args(parser, argv)
  from transformer.cli import use_cores

  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  use_cores(args.threads)  # before JAX starts; CTranslate2's workers get every core back
  quick = args.preset == "quick"
  scratch = Path(tempfile.mkdtemp(prefix="decode-vs-ct2-"))
  from transformer import compilation_cache
  from transformer.runs.translator import Translator

  compilation_cache.enable()
  workdir = quick_run(scratch / "run") if quick else args.workdir
  if workdir is None:
    parser.error("--workdir is needed with --preset full (a trained translation run)")
  rounds, latency_n = (1, 4) if quick else (args.rounds, args.latency_n)
  sources, references = test_set(args.split, 48 if quick else None)
  translator = Translator(workdir)
  search = translator.search
  ct2_model, ct2_missing = (args.ct2_model, None) if args.ct2_model else (None, None)
  if ct2_model is None:
    ct2_model, ct2_missing = convert(Path(workdir), scratch / "ct2")
  ct2_threads = [int(n) for n in args.ct2_threads.split(",")]
  request = dict(
    model=str(ct2_model),
    alpha=search.alpha,
    batch=args.ct2_batch,
    max_len=translator.spec.model.max_len,
    texts=sources,
    cores=cores,
  )
  modes = {"beam": search.beam_size, "greedy": 1}
  for beam in modes.values():  # compile (or load from the compilation cache) before timing
    translator.translate(sources, beam_size=beam, alpha=search.alpha)
  rows: list[dict] = []
  own: dict[str, list[str]] = {}
  for round_ in range(rounds):
    for mode, beam in modes.items():
      systems = [
        ("project", None, lambda b=beam: project_timed(translator, sources, b, search.alpha))
      ]
      if ct2_model is not None:
        systems += [
          (
            "ctranslate2",
            n,
            lambda b=beam, n=n: run_ct2(
              args.ct2_python, {**request, "beam": b, "threads": n, "mode": "batch"}
            ),
          )
          for n in ct2_threads
        ]
      for system, threads, call in systems:
        result = call()
        hypotheses = result.pop("hypotheses")
        if system == "project":
          own.setdefault(mode, hypotheses)
        rows.append(
          dict(
            system=system,
            threads=threads,
            mode=mode,
            beam=beam,
            round=round_,
            **{k: round(v, 3) for k, v in result.items()},
            bleu=bleu(hypotheses, references),
            identical=sum(a == b for a, b in zip(hypotheses, own[mode])),
            load1=round(os.getloadavg()[0], 2),
          )
        )
        print(json.dumps(rows[-1]), flush=True)
  latency = [
    dict(
      system="project",
      beam=search.beam_size,
      median_ms=round(
        project_latency(translator, sources[:latency_n], search.beam_size, search.alpha), 2
      ),
    )
  ]
  for n in ct2_threads if ct2_model is not None else []:
    ct2 = run_ct2(
      args.ct2_python,
      {
        **request,
        "texts": sources[:latency_n],
        "beam": search.beam_size,
        "threads": n,
        "mode": "latency",
      },
    )
    latency.append(
      dict(
        system="ctranslate2",
        threads=n,
        beam=search.beam_size,
        median_ms=round(ct2["median_ms"], 2),
      )
    )
  print(json.dumps(latency))
  common.write_and_plot(
    NAME if args.threads is None else f"{NAME}_threads{args.threads}",
    args.preset,
    {
      "workdir": workdir.name,  # the run folder by name: no machine path in results
      "split": args.split,
      "sentences": len(sources),
      "search": dict(beam_size=search.beam_size, alpha=search.alpha),
      "project_threads": args.threads or "all cores",
      "ctranslate2": (
        f"float32, intra_threads {ct2_threads}, compared at its best"
        if ct2_model is not None
        else ct2_missing
      ),
      "results": rows,
      "summary": summarize(rows),
      "latency": latency,
      "latency_ratio": latency_ratio(latency),
    },
    args.out,
  )


def summarize(rows: list[dict]) -> dict:
  """Per mode: median CPU and wall seconds of each system, and the median of the per-round
  ratios project / CTranslate2, CTranslate2 at its best thread count of the round (fewest CPU
  seconds; its medians per thread count beside)."""
  out = {}
  for mode in dict.fromkeys(r["mode"] for r in rows):
    mine = {r["round"]: r for r in rows if r["mode"] == mode and r["system"] == "project"}
    theirs_all = [r for r in rows if r["mode"] == mode and r["system"] == "ctranslate2"]
    theirs: dict[int, dict] = {}
    for r in theirs_all:
      if r["round"] not in theirs or r["cpu_s"] < theirs[r["round"]]["cpu_s"]:
        theirs[r["round"]] = r
    entry = {
      f"{system}_{key}": statistics.median(r[key] for r in by_round.values())
      for system, by_round in (("project", mine), ("ctranslate2", theirs))
      if by_round
      for key in ("cpu_s", "wall_s", "bleu", "identical")
    }
    for n in sorted({r["threads"] for r in theirs_all}):
      entry[f"ctranslate2_{n}_threads_cpu_s"] = statistics.median(
        r["cpu_s"] for r in theirs_all if r["threads"] == n
      )
    for key in ("cpu_s", "wall_s"):
      ratios = [mine[r][key] / theirs[r][key] for r in mine if r in theirs]
      if ratios:
        entry[f"ratio_{key}"] = round(statistics.median(ratios), 2)
        entry[f"ratio_{key}_per_round"] = [round(x, 2) for x in ratios]
    out[mode] = entry
  return out


def latency_ratio(latency: list[dict]) -> float | None:
  """The project's median batch-1 latency over CTranslate2's best (of its thread counts)."""
  theirs = [r["median_ms"] for r in latency if r["system"] == "ctranslate2"]
  mine = [r["median_ms"] for r in latency if r["system"] == "project"]
  return round(mine[0] / min(theirs), 2) if theirs and mine else None


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--ct2_worker":
    print(json.dumps(ct2_worker(json.loads(Path(sys.argv[2]).read_text()))))
  else:
    sys.exit(main())
