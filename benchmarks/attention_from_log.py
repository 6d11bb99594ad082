"""Rebuilds an attention_vs_rnn result from the lines a run printed, for a run stopped (by a time
limit) before it wrote its JSON.

Each printed line carries a layer's median tokens/s, forward and forward+backward, to three
significant digits; min, max, memory and the block-size sweep are not printed and stay absent.
Crossovers and the acceptance check are recomputed from these medians by the same functions as
in a complete run. The record says where it came from (`provenance`).

  python -m benchmarks.attention_from_log LOG --environment RESULT.json [--note TEXT]

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
                  r"fwd\+bwd (?P<fb>[\d.]+) (?P<fb_unit>[kMG]?)tok/s\s+compile (?P<compile>[\d.]+)s")
SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def parse(text: str) -> list[dict]:
  """One record per printed measurement, in the layout of `attention_vs_rnn.measure`; a layer,
  batch and length printed twice (the block-size sweep) keeps its first line."""
  records = {}
  for match in map(LINE.match, text.splitlines()):
    if not match:
      continue
    layer, batch, length = match["layer"], int(match["batch"]), int(match["length"])
    record = {"layer": layer, "batch": batch, "length": length,
              "sequential_steps_forward": avr.sequential_steps(layer, length)}
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("log", type=Path)
  parser.add_argument("--environment", type=Path, required=True)
  parser.add_argument("--note", default="")
  parser.add_argument("--out", type=Path, default=None, help="default: beside the environment")
  args = parser.parse_args(argv)
  if not args.log.is_file():
    parser.error(f"{args.log} does not exist: pass the log the benchmark printed")
  results = parse(args.log.read_text())
  if not results:
    parser.error(f"{args.log} holds no measurement lines of benchmarks.attention_vs_rnn")
  environment = json.loads(args.environment.read_text())["environment"]
  layers = sorted({r["layer"] for r in results})
  batches = sorted({r["batch"] for r in results})
  baselines = [b for b in ("lstm_autodiff", "lstm", "lstm_cudnn") if b in layers]
  attention = [a for a in ("xla", "blockwise", "blockwise_causal", "cudnn", "cudnn_causal")
               if a in layers]
  record = {
      "benchmark": "attention_vs_rnn", "preset": "full", "environment": environment,
      "provenance": f"parsed from the printed lines of {args.log.name} by "
                    f"benchmarks.attention_from_log (medians to 3 significant digits; no min, "
                    f"max or memory). {args.note}".strip(),
      "d_model": avr.D_MODEL, "num_heads": avr.NUM_HEADS, "block_size": avr.BLOCK,
      "causal_layers": avr.CAUSAL,
      "dtype": "float32 (cudnn attention layers: bfloat16; lstm_cudnn: float32 with TF32)",
      "results": results, "flop_parity_length": {"lstm": 2 * avr.D_MODEL, "gru": avr.D_MODEL},
      # The layers this log holds, not this machine's: a GPU log read on a CPU keeps lstm_cudnn.
      **avr.summary(results, batches, attention, baselines)}
  out = args.out or args.environment.parent / f"attention_vs_rnn_{environment['device']}.json"
  out.write_text(json.dumps(record, indent=1) + "\n")
  print(f"wrote {out} ({len(results)} measurements)")
  plot.plot_attention_vs_rnn(out)


if __name__ == "__main__":
  sys.exit(main())
