"""Runs the whole benchmark suite, one script per process (each writes its JSON and PNG).

Each script runs in a fresh process so one benchmark's buffers and compilation caches cannot
slow the next. `quality_vs_time` runs with a reduced budget: its full comparison trains each
model for 480 s (about 25 minutes with evaluation), so the suite runs its quick preset instead
(30 s of training per model, 128 validation sentences scored every 15 s, no test set; about
200 s on 2 cores), which writes *_quick.json and leaves the committed 480-s result alone; in
the quick suite it trains 15 s per model. On a 2-core CPU the full suite takes about 17 minutes
(estimated from the committed results: train_mfu ~143 s, attention_vs_rnn ~436 s, model_level
~117 s, decode_speed ~133 s, quality_vs_time ~196 s). --preset quick checks in a few minutes
that everything runs (its results go to *_quick.json files).

  python -m benchmarks.run_all [--preset quick|full] [--only name ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


SCRIPTS = ("train_mfu", "attention_vs_rnn", "model_level", "decode_speed", "quality_vs_time")
# script -> suite preset -> (the script's preset, extra flags), where they differ from the suite's.
# The training budget is a multiple of the quick preset's 15-s evaluation interval, so the last
# point of the curve falls at the end of the budget.
OVERRIDES = {"quality_vs_time": {"full": ("quick", ("--budget_s", "30")),
                                 "quick": ("quick", ("--budget_s", "15"))}}


def script_preset(name: str, suite_preset: str) -> tuple[str, tuple[str, ...]]:
  """(preset, extra flags) that `name` runs with in a suite of `suite_preset`."""
  return OVERRIDES.get(name, {}).get(suite_preset, (suite_preset, ()))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=("quick", "full"), default="full")
  parser.add_argument("--only", nargs="*", choices=SCRIPTS, default=SCRIPTS)
  args = parser.parse_args(argv)
  start, failed = time.perf_counter(), []
  for name in args.only:
    preset, extra = script_preset(name, args.preset)
    print(f"== {name} (--preset {preset} {' '.join(extra)})".rstrip(), flush=True)
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", "--preset", preset,
                            *extra])
    print(f"== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if code:
      failed.append(name)
  print(f"suite done in {time.perf_counter() - start:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
