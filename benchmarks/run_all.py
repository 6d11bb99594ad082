"""Runs the whole benchmark suite, one script per process (each writes its JSON and PNG).

Each script runs in a fresh process so one benchmark's buffers and compilation caches cannot
slow the next. `quality_vs_time` runs as a smoke check of its pipeline: its real comparison
trains each model for 480 s (about 25 minutes with evaluation, run on its own), so the suite runs
its quick preset for 15 s of training per model (128 validation sentences scored every 15 s, no
test set), which writes *_quick.json and leaves the committed 480-s result alone. The whole
suite must finish within 15 minutes on a 2-core CPU; the README gives the latest measured time.
--preset quick checks in a few minutes that everything runs (its results go to *_quick.json).

  python -m benchmarks.run_all [--preset quick|full] [--only name ...]
"""

from __future__ import annotations

import subprocess
import sys
import time

from transformer.cli import ArgumentParser

SCRIPTS = (
  "train_mfu",
  "attention_vs_rnn",
  "model_level",
  "decode_speed",
  "quality_vs_time",
  "decode_vs_ctranslate2",
  "lm_vs_nanogpt",
)
# script -> suite preset -> (the script's preset, extra flags), where they differ from the suite's.
# The training budget is a multiple of the quick preset's 15-s evaluation interval, so the last
# point of the curve falls at the end of the budget.
# decode_vs_ctranslate2 needs a trained run for its real comparison (see benchmarks/README.md):
# the suite checks its pipeline on a random tiny run. lm_vs_nanogpt needs nanoGPT's source and
# torch for its comparison (run on its own, see its docstring); in the suite it checks the
# project's side on the text alone.
OVERRIDES = {
  "quality_vs_time": dict.fromkeys(("quick", "full"), ("quick", ("--budget_s", "15"))),
  "decode_vs_ctranslate2": dict.fromkeys(("quick", "full"), ("quick", ())),
  "lm_vs_nanogpt": dict.fromkeys(("quick", "full"), ("quick", ())),
}


def script_preset(name: str, suite_preset: str) -> tuple[str, tuple[str, ...]]:
  """(preset, extra flags) that `name` runs with in a suite of `suite_preset`."""
  return OVERRIDES.get(name, {}).get(suite_preset, (suite_preset, ()))


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=("quick", "full"), default="full")
  parser.add_argument("--only", nargs="*", choices=SCRIPTS, default=SCRIPTS)
  parser.add_argument(
    "--out", default=None, help="folder for every script's results (default: benchmarks/results)"
  )
  args = parser.parse_args(argv)
  start, failed = time.perf_counter(), []
  for name in args.only:
    preset, extra = script_preset(name, args.preset)
    print(f"== {name} (--preset {preset} {' '.join(extra)})".rstrip(), flush=True)
    t0 = time.perf_counter()
    out = ("--out", args.out) if args.out else ()
    code = subprocess.call(
      [sys.executable, "-m", f"benchmarks.{name}", "--preset", preset, *extra, *out]
    )
    print(
      f"== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {time.perf_counter() - t0:.0f} s",
      flush=True,
    )
    if code:
      failed.append(name)
  print(
    f"suite done in {time.perf_counter() - start:.0f} s"
    + (f"; failed: {', '.join(failed)}" if failed else "")
  )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
