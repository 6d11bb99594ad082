"""Runs the whole benchmark suite, one script per process, then plots every result.

Each script runs in a fresh process so one benchmark's buffers and compilation caches cannot
slow the next. On a 2-core CPU the full preset takes about 13 minutes (764 and 798 s measured);
--preset quick checks in a few minutes that everything runs (its results go to *_quick.json
files).

  python -m benchmarks.run_all [--preset quick|full] [--only name ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import common

SCRIPTS = ("train_mfu", "attention_vs_rnn", "model_level", "decode_speed")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=("quick", "full"), default="full")
  parser.add_argument("--only", nargs="*", choices=SCRIPTS, default=SCRIPTS)
  args = parser.parse_args(argv)
  start, failed = time.perf_counter(), []
  for name in args.only:
    print(f"== {name} ({args.preset})", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", "--preset", args.preset])
    print(f"== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if code:
      failed.append(name)
  from benchmarks import plot
  for name in args.only:
    path = common.result_path(name, args.preset)
    if path.exists():
      plot.plot_file(path)
  print(f"suite done in {time.perf_counter() - start:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
