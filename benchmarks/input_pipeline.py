"""The input pipeline at WMT scale: preparation, start-up, memory, throughput; buckets vs packing.

The corpus is the shipped Multi30k with its training split repeated `scale` times (x155 is
4,495,000 pairs, the size of WMT14 English-German; the other splits as shipped). For each scale,
each in a fresh process (its peak RSS from `wait4`) and with an empty data cache:

  first start   `train.py --config default --config.data.source_dir=CORPUS
                --config.num_train_steps=2`: tfds preparation, tokenizer training, encoding into
                the token cache, two steps
  second start  the same command with num_train_steps=4: it resumes, reads the cache
  to first batch  a process that imports the package, opens the inputs (`training_inputs`) and
                takes one training batch: the pipeline's own start-up
  throughput    the stream read as fast as it goes for `--read_s` seconds, bucketing and packing,
                at the recipe's 2,048-token batches and at WMT's 25,000: batches/s, real (non-
                padding) target tokens/s, the share of target slots that are padding

and, at the largest scale, a CPU training run of the default recipe with packing, whose logged
`train/data_wait_fraction` is the share of the loop's time spent waiting for a batch.

  python -m benchmarks.input_pipeline [--preset quick|full] [--scales 1 10 155]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

PRESETS = {
  "quick": dict(scales=(1, 3), read_s=3.0, train_steps=0),
  "full": dict(scales=(1, 10, 155), read_s=20.0, train_steps=60),
}
SPLIT_STEMS = ("train", "val", "test_2016_flickr", "test_2017_flickr")


def write_corpus(directory: Path, scale: int) -> int:
  """The shipped corpus with its training split repeated `scale` times; returns its pair count."""
  from transformer.data.multi30k import DEFAULT_SOURCE_DIR, read_lines

  directory.mkdir(parents=True, exist_ok=True)
  pairs = 0
  for stem in SPLIT_STEMS:
    for lang in ("en", "de"):
      lines = read_lines(DEFAULT_SOURCE_DIR / f"{stem}.{lang}.gz")
      repeat = scale if stem == "train" else 1
      text = ("\n".join(lines) + "\n").encode()
      with gzip.open(directory / f"{stem}.{lang}.gz", "wb", compresslevel=1) as f:
        for _ in range(repeat):
          f.write(text)
      pairs += len(lines) * repeat if stem == "train" and lang == "en" else 0
  return pairs


def measured(command: list[str], env: dict[str, str]) -> dict:
  """Runs `command`; its wall time, peak RSS (from `wait4`: this child alone) and stdout."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  if process.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
  # Linux reports ru_maxrss in kB.
  first = re.search(r"first training batch ([\d.]+) s after the process started", stderr)
  return {
    "wall_s": round(wall, 2),
    "peak_rss_bytes": usage.ru_maxrss * 1024,
    "stdout": stdout,
    "first_batch_s": float(first[1]) if first else None,
  }


def run_child(args: list[str], env: dict[str, str]) -> dict:
  """This script in child mode, measured; its last stdout line is JSON."""
  result = measured([sys.executable, "-m", "benchmarks.input_pipeline", "--child", *args], env)
  return {
    **json.loads(result["stdout"].strip().splitlines()[-1]),
    "wall_s": result["wall_s"],
    "peak_rss_bytes": result["peak_rss_bytes"],
  }


def train_command(corpus: Path, workdir: Path, steps: int, *extra: str) -> list[str]:
  return [
    sys.executable,
    str(common.REPO_ROOT / "train.py"),
    "--config",
    "default",
    "--workdir",
    str(workdir),
    f"--config.data.source_dir={corpus}",
    f"--config.num_train_steps={steps}",
    "--config.decode.bleu_at_end=False",
    *extra,
  ]


def report(what: str, run: dict) -> None:
  print(
    f"   {what}: first batch after {run['first_batch_s']:.1f} s, {run['wall_s']:.0f} s in "
    f"all, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB",
    flush=True,
  )


def scale_row(scale: int, root: Path, preset: dict) -> dict:
  corpus, cache = root / f"corpus_x{scale}", root / f"cache_x{scale}"
  workdir = root / f"run_x{scale}"
  print(f"== x{scale}: writing the corpus", flush=True)
  pairs = write_corpus(corpus, scale)
  env = {**os.environ, "TRANSFORMER_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}
  first = measured(train_command(corpus, workdir, 2), env)
  report("first start (prepare + 2 steps)", first)
  second = measured(train_command(corpus, workdir, 4), env)
  report("second start (resume, 2 more steps)", second)
  start = run_child(["--corpus", str(corpus), "--workdir", str(workdir), "--mode", "start"], env)
  print(
    f"   pipeline to first batch: {start['first_batch_s']:.1f} s, "
    f"{start['peak_rss_bytes'] / 2**30:.2f} GiB",
    flush=True,
  )
  reads = []
  for tokens in (2048, 25_000):
    for packing in (False, True):
      read = run_child(
        [
          "--corpus",
          str(corpus),
          "--workdir",
          str(workdir),
          "--mode",
          "read",
          "--tokens",
          str(tokens),
          "--read_s",
          str(preset["read_s"]),
        ]
        + (["--packing"] if packing else []),
        env,
      )
      reads.append(read)
      print(
        f"   {'packing' if packing else 'buckets'} {tokens:>6} tokens/batch: "
        f"{read['batches_per_s']:,.0f} batches/s, {read['real_target_tokens_per_s']:,.0f} "
        f"real target tokens/s, padding {read['target_padding']:.1%}",
        flush=True,
      )
  row = {
    "scale": scale,
    "pairs": pairs,
    "first_start": _strip(first),
    "second_start": _strip(second),
    "pipeline_start": start,
    "reads": reads,
    "cache_bytes": sum(p.stat().st_size for p in (cache / "tokens").rglob("*") if p.is_file()),
  }
  shutil.rmtree(cache / "tfds", ignore_errors=True)  # the largest part of a scale's disk use
  return row


def _strip(result: dict) -> dict:
  return {k: v for k, v in result.items() if k != "stdout"}


def training_wait(scale: int, root: Path, steps: int) -> dict:
  """A CPU training run of the default recipe with packing on the largest corpus: how much of
  the loop's time went to waiting for batches."""
  corpus, workdir = root / f"corpus_x{scale}", root / "run_packed"
  env = {
    **os.environ,
    "TRANSFORMER_CACHE_DIR": str(root / f"cache_x{scale}"),
    "JAX_PLATFORMS": "cpu",
  }
  run = measured(
    train_command(
      corpus, workdir, steps, "--config.data.packing=True", "--config.log_every_steps=20"
    ),
    env,
  )
  lines = [
    json.loads(line)
    for line in (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
  ]
  waits = [m["train/data_wait_fraction"] for m in lines if "train/data_wait_fraction" in m]
  rates = [m["train/tokens_per_second"] for m in lines if "train/tokens_per_second" in m]
  print(
    f"   training with packing, {steps} steps: data wait per 20-step window "
    f"{', '.join(f'{w:.2%}' for w in waits)}",
    flush=True,
  )
  return {
    "steps": steps,
    "log_every_steps": 20,
    "data_wait_fraction": waits,
    "target_tokens_per_s": rates,
    **_strip(run),
  }


# ------------------------------------------------------------------------------------------------
# Child mode: one measurement in a fresh process
# ------------------------------------------------------------------------------------------------


def child(args) -> dict:
  start = time.perf_counter()
  import numpy as np

  from transformer.config import Config
  from transformer.configs import default
  from transformer.data.corpus import Location
  from transformer.data.inputs import training_inputs

  recipe = default.get_config()
  recipe.data.source_dir = args.corpus
  data = Config.of(recipe).data
  inputs = training_inputs(
    data,
    Location.of(data, args.workdir),
    task="translation",
    seed=0,
    batch_tokens=args.tokens,
    packing=args.packing,
    prefetch=4,
  )
  batch = next(inputs.train)
  first_batch_s = time.perf_counter() - start
  if args.mode == "start":
    inputs.train.close()
    return {"first_batch_s": round(first_batch_s, 2), "batch_shape": list(batch["targets"].shape)}
  batches, real, slots, began = 0, 0, 0, time.perf_counter()
  while time.perf_counter() - began < args.read_s:
    batch = next(inputs.train)
    batches += 1
    real += int(np.count_nonzero(batch["targets"]))
    slots += batch["targets"].size
  elapsed = time.perf_counter() - began
  inputs.train.close()
  return {
    "packing": args.packing,
    "tokens_per_batch": args.tokens,
    "batches": batches,
    "seconds": round(elapsed, 2),
    "batches_per_s": batches / elapsed,
    "real_target_tokens_per_s": real / elapsed,
    "target_padding": 1 - real / slots,
    "first_batch_s": round(first_batch_s, 2),
  }


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument("--scales", type=int, nargs="*", help="training-split repeats to measure")
  parser.add_argument(
    "--workdir",
    type=Path,
    default=None,
    help="scratch folder for corpora, caches and runs (default: a temporary "
    "one, removed at the end)",
  )
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mode", choices=("start", "read"), help=argparse.SUPPRESS)
  parser.add_argument("--corpus", help=argparse.SUPPRESS)
  parser.add_argument("--tokens", type=int, default=2048, help=argparse.SUPPRESS)
  parser.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--read_s", type=float, default=10.0, help=argparse.SUPPRESS)
  args = common.parse_args(parser, argv)
  if args.child:
    print(json.dumps(child(args)))
    return 0
  preset = dict(PRESETS[args.preset])
  scales = tuple(args.scales or preset["scales"])
  if any(s < 1 for s in scales):
    parser.error("--scales are positive repeat counts, e.g. 1 10 155")
  root = args.workdir or Path(tempfile.mkdtemp(prefix="input_pipeline_"))
  try:
    rows = [scale_row(scale, root, preset) for scale in scales]
    payload = {"recipe": "default", "scales": scales, "results": rows}
    if preset["train_steps"]:
      payload["training"] = training_wait(max(scales), root, preset["train_steps"])
    common.write_and_plot("input_pipeline", args.preset, payload, args.out)
  finally:
    if args.workdir is None:
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
