"""BLEU against wall-clock time of finished training runs, from their own logs.

Every evaluation of a translation run records the validation split's greedy BLEU and the seconds
since the process started (`eval/bleu_greedy`, `time/elapsed_s` in metrics.jsonl); the final
line adds the test sets' beam-search BLEU (results.json). This script collects those points of
one or more runs into one JSON and plot:

  python -m benchmarks.time_to_bleu --name multi30k_cpu RUN_DIR [LABEL=RUN_DIR ...]

A resumed run's curve continues from its own earlier points; a run started again from scratch in
the same folder would mix two runs (use a fresh folder per run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import common
from transformer.cli import run_cli
from transformer.config import read_config, read_json
from transformer.errors import MissingFile, UserError


def run_curve(workdir: Path) -> dict:
  """The run's points (step, seconds, greedy validation BLEU, validation loss) and its final
  test scores."""
  metrics = workdir / "metrics.jsonl"
  if not metrics.is_file():
    raise MissingFile(f"{metrics} is missing: give the folder of a training run")
  points = [
    {
      "step": record.get("step"),
      "elapsed_s": record.get("time/elapsed_s"),
      "validation_bleu_greedy": record["eval/bleu_greedy"],
      "validation_loss": record.get("eval/loss"),
    }
    for record in metric_records(metrics)
    if "eval/bleu_greedy" in record
  ]
  if not points:
    raise UserError(f"{metrics} has no validation BLEU: train with decode.validation_bleu=True")
  results_path = workdir / "results.json"
  results = read_json(results_path) if results_path.is_file() else {}
  config = read_config(workdir).to_dict()
  return {
    "workdir": workdir.name,  # the run folder by name: no machine path in results
    "points": points,
    "test_bleu": {k.removeprefix("bleu/"): v for k, v in results.items() if k.startswith("bleu/")},
    "model": config["model"],
    "optimizer": config["optimizer"],
    "data": {
      k: config["data"][k] for k in ("tokens_per_batch", "packing", "vocab_size", "max_len")
    },
    "num_train_steps": config["num_train_steps"],
    "decode": config["decode"],
  }


def metric_records(path: Path) -> list[dict]:
  """The records of a metrics.jsonl. Its last line may be cut short (the run was killed while
  writing it): it is left out with a warning. A damaged line before it is a one-line error."""
  lines = path.read_text(encoding="utf-8").split("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict):
      records.append(record)
    elif number == len(lines):  # no newline after it: the write was cut off
      print(f"warning: {path} line {number} is cut short; left out", file=sys.stderr)
    else:
      raise UserError(f"{path} line {number} is not a JSON record: the file is damaged")
  return records


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", help="run folders, optionally LABEL=FOLDER")
  parser.add_argument("--name", required=True, help="what the curves show, in the file name")
  args = common.parse_args(parser, argv)
  curves = {}
  for item in args.workdirs:
    label, _, folder = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
    curves[label] = run_curve(Path(folder))
  payload = {"name": args.name, "runs": curves}
  common.write_and_plot(f"time_to_bleu_{args.name}", args.preset, payload, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(main))
