"""Rebuilds an attention_vs_rnn result from the lines a run printed, for a run stopped (by a time
limit) before it wrote its JSON.

Each printed line carries a layer's median tokens/s, forward and forward+backward, to three
significant digits; min, max, memory and the block-size sweep are not printed and stay absent.
Crossovers and the acceptance check are recomputed from these medians by the same functions as
in a complete run. The record says where it came from (`provenance`).

  python -m benchmarks.attention_from_log LOG --environment RESULT.json [--note TEXT]
      [--block_size K] [--out PATH]

`--environment` names a JSON result of the same machine and run (written by another script of
the same call) whose `environment` block is copied.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import attention_vs_rnn as avr
from benchmarks import plot

LINE = re.compile(r"^\s+(?P<layer>\w+)\s+B=(?P<batch>\d+)\s+T=(?P<length>\d+)\s+"
                  r"(?:fwd (?P<fwd>[\d.]+) (?P<fwd_unit>[kMG]?)tok/s\s+)?"
                  r"fwd\+bwd (?P<fb>[\d.]+) (?P<fb_unit>[kMG]?)tok/s\s+"
                  r"compile (?P<compile>[\d.]+)s")
SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def parse(text: str, block_size: int = avr.BLOCK) -> list[dict]:
  """One record per printed measurement, in the layout of `attention_vs_rnn.measure`; a layer,
  batch and length printed twice (the block-size sweep) keeps its first line."""
  records = {}
  for match in map(LINE.match, text.splitlines()):
    if not match:
      continue
    layer, batch, length = match["layer"], int(match["batch"]), int(match["length"])
    record = {"layer": layer, "batch": batch, "length": length,
              "sequential_steps_forward": avr.sequential_steps(layer, length, block_size)}
    flops = avr.forward_flops(layer, batch, length)
    modes = [("forward_backward", match["fb"], match["fb_unit"], 3 * flops)]
    if match["fwd"]:
      modes.append(("forward", match["fwd"], match["fwd_unit"], flops))
    for mode, value, unit, mode_flops in modes:
      tokens_per_s = float(value) * SCALE[unit]
      record[mode] = {"tokens_per_s": tokens_per_s, "flops": mode_flops,
                      "flop_per_s": mode_flops * tokens_per_s / (batch * length)}
    record["forward_backward"]["compile_s"] = float(match["compile"])
    records.setdefault((layer, batch, length), record)
  return list(records.values())


def read_environment(parser: argparse.ArgumentParser, path: Path) -> dict:
  """The `environment` block of another JSON result; a missing or unsuitable file ends the run
  with a one-line message."""
  if not path.is_file():
    parser.error(f"--environment {path} does not exist: pass a JSON result written by another "
                 "benchmark of the same machine and run")
  try:
    return json.loads(path.read_text())["environment"]
  except (json.JSONDecodeError, KeyError, TypeError):
    parser.error(f"--environment {path} is not a benchmark JSON with an 'environment' block")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("log", type=Path)
  parser.add_argument("--environment", type=Path, required=True)
  parser.add_argument("--note", default="")
  parser.add_argument("--block_size", type=int, default=avr.BLOCK,
                      help="the blockwise key block of the run (the log does not print it; "
                           "default: the library's current one)")
  parser.add_argument("--out", type=Path, default=None, help="default: beside the environment")
  args = parser.parse_args(argv)
  if not args.log.is_file():
    parser.error(f"{args.log} does not exist: pass the log the benchmark printed")
  if args.block_size < 1:
    parser.error("--block_size must be a positive number of keys")
  results = parse(args.log.read_text(), args.block_size)
  if not results:
    parser.error(f"{args.log} holds no measurement lines of benchmarks.attention_vs_rnn")
  environment = read_environment(parser, args.environment)
  record = {
      "benchmark": "attention_vs_rnn", "preset": "full", "environment": environment,
      "provenance": f"parsed from the printed lines of {args.log.name} by "
                    f"benchmarks.attention_from_log (medians to 3 significant digits; no min, "
                    f"max or memory). {args.note}".strip(),
      **avr.record_header(), "block_size": args.block_size, "results": results,
      # Derived from the layers this log holds, not this machine's: a GPU log read on a CPU
      # keeps lstm_cudnn and the cuDNN attention layers.
      **avr.summary(results)}
  out = args.out or args.environment.parent / f"attention_vs_rnn_{environment['device']}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=1) + "\n")
  print(f"wrote {out} ({len(results)} measurements)")
  plot.plot_attention_vs_rnn(out)


if __name__ == "__main__":
  sys.exit(main())
