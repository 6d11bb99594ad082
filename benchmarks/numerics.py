"""Do the two cheap GPU wins change training? Validation loss of the GPU recipe's model with
bfloat16 logits and with the "rbg" dropout PRNG, against float32 logits and threefry.

Three runs of `python train.py --config multi30k_gpu`, same seed and data order, differing in one
model setting each:

  baseline      model.logits_dtype=float32   model.dropout_rng=threefry2x32
  bf16_logits   model.logits_dtype=bfloat16  (float32 loss, as always)
  rbg           model.dropout_rng=rbg

with validation loss every 250 steps. "Holds" means |loss_variant / loss_baseline - 1| <= 1% at
every evaluated step that all runs reached. On a CPU the compute dtype is float32
(`--config.model.dtype=float32`; bfloat16 compute is very slow there), so the logits variant
isolates the rounding of the logits and their gradient to bfloat16.

`run` trains the three in lockstep, one process at a time: each is resumed up to the next
multiple of --chunk before the next one moves, so a run cut short (a session's end) leaves all
three at about the same step, and the same command continues them (resuming is exact: the same
batches and dropout masks). `compare` writes the curves as JSON and PNG.

  nice -n 15 python -m benchmarks.numerics run --root runs/numerics [--steps 2000 --chunk 250]
  python -m benchmarks.numerics compare --root runs/numerics [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import common

VARIANTS = {
  "baseline": ("--config.model.logits_dtype=float32", "--config.model.dropout_rng=threefry2x32"),
  "bf16_logits": (
    "--config.model.logits_dtype=bfloat16",
    "--config.model.dropout_rng=threefry2x32",
  ),
  "rbg": ("--config.model.logits_dtype=float32", "--config.model.dropout_rng=rbg"),
}
# The recipe as it trains on a GPU, but for float32 compute and no BLEU (loss curves only), no
# checkpoint averaging (the last evaluation is of the step's own parameters).
COMMON = (
  "--config=multi30k_gpu",
  "--config.model.dtype=float32",
  "--config.eval_every_steps=250",
  "--config.log_every_steps=50",
  "--config.checkpoint_every_steps=1000",
  "--config.average_last_checkpoints=0",
  "--config.decode.validation_bleu=False",
  "--config.decode.bleu_at_end=False",
)
TOLERANCE = 0.01
NAME = "numerics_bf16_logits_rbg"


def saved_step(workdir: Path) -> int:
  """The newest checkpoint's step of a run, 0 before its first."""
  folder = workdir / "checkpoints"
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return max(steps, default=0)


def train_command(workdir: Path, variant: str, steps: int) -> list[str]:
  return [
    sys.executable,
    str(common.REPO_ROOT / "train.py"),
    f"--workdir={workdir}",
    *COMMON,
    f"--config.num_train_steps={steps}",
    *VARIANTS[variant],
  ]


def run(root: Path, steps: int, chunk: int) -> None:
  """Trains every variant to `steps`, all advancing `chunk` steps at a time."""
  for target in range(chunk, steps + chunk, chunk):
    target = min(target, steps)
    for variant in VARIANTS:
      workdir = root / variant
      if saved_step(workdir) >= target:
        continue
      command = train_command(workdir, variant, target)
      print(f"{variant}: to step {target}", flush=True)
      with open(root / f"{variant}.log", "a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def logged(workdir: Path, key: str) -> dict[int, float]:
  """{step: value of `key`} from a run's metrics.jsonl, {} before its first line; a step
  logged twice (evaluated again after a resume) keeps the last value."""
  path = workdir / "metrics.jsonl"
  values = {}
  for line in path.read_text().splitlines() if path.is_file() else ():
    record = json.loads(line)
    if key in record:
      values[int(record["step"])] = float(record[key])
  return values


def comparison(curves: dict[str, dict[int, float]], tolerance: float = TOLERANCE) -> dict:
  """Each variant's ratio to the baseline at every step both evaluated, and whether
  |ratio - 1| <= tolerance at all of them; `steps`: the steps every run evaluated."""
  base = curves["baseline"]
  variants = {}
  for name, curve in curves.items():
    if name == "baseline":
      continue
    steps = sorted(set(curve) & set(base))
    ratios = [curve[s] / base[s] for s in steps]
    worst = max((abs(r - 1) for r in ratios), default=float("nan"))
    variants[name] = {
      "steps": steps,
      "ratios": ratios,
      "max_abs_deviation": worst,
      "holds": bool(steps) and worst <= tolerance,
    }
  common_steps = sorted(set.intersection(*(set(c) for c in curves.values())))
  return {"steps": common_steps, "tolerance": tolerance, "variants": variants}


def compare(root: Path, out: Path, steps: int) -> Path:
  curves = {v: logged(root / v, "eval/loss") for v in VARIANTS}
  result = comparison(curves)
  reached = max(result["steps"], default=0)
  for name, verdict in result["variants"].items():
    print(
      f"{name}: max |loss / baseline - 1| = {verdict['max_abs_deviation']:.4%} over steps "
      f"{verdict['steps']} -> {'holds' if verdict['holds'] else 'does NOT hold'}"
    )
  # Context, not the criterion: the training loss (mean of each 50-step window) of the variants
  # against the baseline's at every logged step all runs reached.
  train = comparison({v: logged(root / v, "train/loss") for v in VARIANTS})
  payload = {
    "train_loss_comparison": {
      "steps": train["steps"],
      **{name: v["max_abs_deviation"] for name, v in train["variants"].items()},
    },
    "question": "validation loss within 1% of float32 logits + threefry dropout at every "
    "evaluation (GPU recipe's model, float32 compute on the CPU)",
    "command": "nice -n 15 python -m benchmarks.numerics run --root ROOT --steps "
    f"{steps}; python -m benchmarks.numerics compare --root ROOT",
    "train_flags": {v: [*COMMON, *VARIANTS[v]] for v in VARIANTS},
    "planned_steps": steps,
    "steps_reached_by_all": reached,
    "complete": reached >= steps,
    "eval_loss": {v: {str(s): loss for s, loss in sorted(c.items())} for v, c in curves.items()},
    "train_loss": {
      v: {str(s): loss for s, loss in sorted(logged(root / v, "train/loss").items())}
      for v in VARIANTS
    },
    "models": {
      v: json.loads((root / v / "config.json").read_text())["model"]
      for v in VARIANTS
      if (root / v / "config.json").is_file()
    },
    **result,
  }
  return common.write_and_plot(NAME, "full", payload, out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("action", choices=("run", "compare"))
  parser.add_argument("--root", type=Path, required=True, help="folder of the three run folders")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--chunk", type=int, default=250, help="lockstep stride, in steps")
  parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
  args = parser.parse_args(argv)
  args.root.mkdir(parents=True, exist_ok=True)
  if args.action == "run":
    run(args.root.absolute(), args.steps, args.chunk)
  else:
    compare(args.root, args.out, args.steps)


if __name__ == "__main__":
  sys.exit(main())
