"""How long a finished run's final scoring takes: what `transformer.train.loop.run` does after its
last step (average the last checkpoints, export, validation loss and greedy validation BLEU, beam
search and BLEU on every test set), timed part by part on a copy of the run.

The run is restored from its newest checkpoint first (startup, not timed). As in training, the
validation programs have run before the end (training evaluates every eval_every_steps), so one
untimed evaluation precedes the timed tail; the beam-search programs are compiled inside it,
unless the persistent compilation cache already holds them (`--cold` points the cache at an empty
folder).

  python -m benchmarks.final_scoring --workdir COPY_OF_A_FINISHED_RUN [--cold]

It rewrites COPY/model, COPY/translations and COPY/bleu.json: give it a copy.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from transformer.cli import ArgumentParser


def main(argv=None) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", type=Path, required=True, help="a copy of a finished run")
  parser.add_argument(
    "--cold", action="store_true", help="compile everything (an empty compilation cache)"
  )
  args = parser.parse_args(argv)
  if args.cold:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-")
  from transformer import compilation_cache
  from transformer.config import read_config
  from transformer.decode.scoring import write_report
  from transformer.train import finish
  from transformer.train.setup import opened

  compilation_cache.enable()
  config = read_config(args.workdir)
  start = time.perf_counter()
  with opened(config, args.workdir) as (run, state):
    finish.evaluation(run, state.params)  # what the run's earlier evaluations compiled
    parts = {"startup_and_warm_evaluation_s": time.perf_counter() - start}
    cpu, wall = time.process_time(), time.perf_counter()

    def lap(name: str) -> None:
      nonlocal wall
      parts[name] = time.perf_counter() - wall
      wall = time.perf_counter()

    compiling = finish.compile_test_search(run, state.params)
    params, averaged = finish.final_params(run, state)
    lap("average_s")
    finish.export(run, int(state.step), params, averaged)
    lap("export_s")
    results = finish.evaluation(run, params)
    lap("validation_loss_and_greedy_bleu_s")
    if compiling is not None:
      compiling.join()
    lap("waiting_for_the_search_compile_s")
    scores = finish.score(
      run, params, run.inputs.test_sets, run.config.decode, args.workdir / "translations"
    )
    write_report(scores, args.workdir / "bleu.json")
    lap("beam_search_test_sets_s")
  tail = sum(v for k, v in parts.items() if not k.startswith("startup"))
  report = {
    **{k: round(v, 2) for k, v in parts.items()},
    "final_scoring_wall_s": round(tail, 2),
    "final_scoring_cpu_s": round(time.process_time() - cpu, 2),
    "bleu": {split: round(r["bleu"], 2) for split, r in scores.items()},
    "eval/bleu_greedy": round(results["eval/bleu_greedy"], 2),
    "compilation_cache": "empty" if args.cold else "as found",
    "load1": round(os.getloadavg()[0], 2),
  }
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
