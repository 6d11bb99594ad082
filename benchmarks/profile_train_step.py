"""Where a train step's time goes: a `jax.profiler` trace of the jitted step, summed per XLA op
and per kind of op (matmul, elementwise fusion, reduction, data movement, ...).

On CPU every executed HLO instruction (a "thunk") is a trace event on the XLA worker threads,
named like the instruction in the optimised HLO; its kind is read from that HLO text. A matmul is
a `dot` or a fusion that contains one (XNNPACK "ynn" fusions included). Times are summed over
the two worker threads: an op that XNNPACK parallelises inside appears once with its wall time,
while two independent ops running at once on the two threads both count, so the total can
exceed the step's wall time.

On a GPU the events are the kernels on the device's streams; each carries the HLO instruction it
runs (the `hlo_op` stat), so kernels are summed per instruction as on CPU. cuBLAS matmuls and
cuDNN attention are custom calls in the HLO and count as "matmul" and "attention (cuDNN)".

After one untimed warm-up step, `--runs` steps (at least 5) are each traced on their own; every
figure reported (total, per kind, per op) is the median over those steps, so one step disturbed
by the machine does not decide the breakdown. Medians per kind need not add up to the median
total.

  python -m benchmarks.profile_train_step [--preset quick|full] [--config small] [--batch 32]
"""

from __future__ import annotations

import collections
import re
import statistics
import sys
import tempfile
from pathlib import Path

import jax
from flax import nnx
from jax.profiler import ProfileData

from benchmarks import common
from benchmarks.steps import CONFIGS, build_step, compute_dtype, random_batch
from transformer import EncoderDecoder
from transformer.train.flops import train_flops

IGNORED = re.compile(r"^(ThreadpoolListener|ThunkExecutor|end: |\$|PjitFunction|Parse|Python)")


def op_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> kind, from the optimised HLO of the whole program."""
  bodies = dict(re.findall(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M))
  kinds = {}
  for name, opcode, rest in re.findall(r"%([\w.\-]+) = [^=]*? ([a-z\-]+)\((.*)$", hlo_text, re.M):
    called = re.search(r"calls=%([\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else ""
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    target = target.group(1).lower() if target else ""
    if (
      opcode in ("dot", "convolution")
      or " dot(" in body
      or name.startswith("ynn")
      or "gemm" in target
      or "cublas" in target
      or "__triton_gemm" in rest
    ):
      kinds[name] = "matmul"
    elif "cudnn" in target and ("fmha" in target or "attention" in target):
      kinds[name] = "attention (cuDNN)"
    elif opcode == "fusion" and (" reduce(" in body or "reduce" in name):
      kinds[name] = "reduction fusion"
    elif opcode == "fusion":
      kinds[name] = "elementwise fusion"
    elif opcode in (
      "copy",
      "transpose",
      "dynamic-update-slice",
      "dynamic-slice",
      "slice",
      "concatenate",
      "pad",
      "broadcast",
      "gather",
      "scatter",
    ):
      kinds[name] = "data movement"
    elif opcode in ("rng-bit-generator", "rng"):
      kinds[name] = "random bits"
    else:
      kinds[name] = opcode
  return kinds


def _hlo_op(event) -> str:
  """The HLO instruction a GPU kernel runs (its `hlo_op` stat), else the kernel's name."""
  for key, value in getattr(event, "stats", ()):
    if key == "hlo_op":
      return str(value)
  return event.name


def trace_events(directory: Path) -> list[tuple[str, float]]:
  """(op name, seconds) of every thunk event on the XLA:CPU threads, or of every kernel on the
  GPU's streams."""
  path = sorted(directory.glob("**/*.xplane.pb"))[-1]
  events = []
  for plane in ProfileData.from_file(str(path)).planes:
    on_gpu = plane.name.startswith("/device:GPU")
    for line in plane.lines:
      if on_gpu and "Stream" in line.name:
        events += [(_hlo_op(e), e.duration_ns * 1e-9) for e in line.events]
      elif "XLAEigen" in line.name or "PjRtCpuClient" in line.name:
        events += [(e.name, e.duration_ns * 1e-9) for e in line.events if not IGNORED.match(e.name)]
  return events


def profiled_step(compiled, state, batch):
  """(new state, [(op name, seconds)]) of one step run under the profiler."""
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory)
    state, _ = jax.block_until_ready(compiled(state, batch))
    jax.profiler.stop_trace()
    return state, trace_events(Path(directory))


def median_seconds(per_run: list[collections.Counter]) -> dict[str, float]:
  """Each key's median seconds over the runs (0 in a run it is absent from), largest first."""
  keys = set().union(*per_run)
  medians = {key: statistics.median(run.get(key, 0.0) for run in per_run) for key in keys}
  return dict(sorted(medians.items(), key=lambda item: -item[1]))


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument("--config", choices=tuple(CONFIGS), default=None)
  parser.add_argument("--batch", type=int, default=None, help="pairs per step (default 32)")
  args = common.parse_args(parser, argv)
  if args.batch is not None and args.batch < 1:
    parser.error(f"--batch {args.batch}: give a positive number of sentence pairs, e.g. 32")
  name = args.config or ("tiny" if args.preset == "quick" else "small")
  config = CONFIGS[name](dtype=compute_dtype())
  batch_size, length = (4, 16) if args.preset == "quick" else (32, 64)
  batch_size = args.batch or batch_size
  steps, state = build_step(EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1)))
  batch = random_batch(config.vocab_size, batch_size, length, length)
  compiled, _ = common.compile_jitted(steps.train_step, state, batch, donate_argnums=0)
  state, _ = jax.block_until_ready(compiled(state, batch))  # warm-up
  kinds = op_kinds(compiled.as_text())
  by_op_runs, by_kind_runs = [], []
  for _ in range(args.runs):
    state, events = profiled_step(compiled, state, batch)
    by_op, by_kind = collections.Counter(), collections.Counter()
    for op, seconds in events:
      by_op[op] += seconds
      by_kind[kinds.get(op, "other")] += seconds
    by_op_runs.append(by_op)
    by_kind_runs.append(by_kind)
  totals = [sum(by_kind.values()) for by_kind in by_kind_runs]
  total = statistics.median(totals)
  by_kind = median_seconds(by_kind_runs)
  print(
    f"{name} B={batch_size}: {total * 1e3:.1f} ms of XLA op time per step, median of "
    f"{args.runs} traced steps (summed over threads or streams)"
  )
  for kind, seconds in by_kind.items():
    print(f"  {kind:20s} {seconds * 1e3:8.1f} ms  {seconds / total:6.1%}")
  top = [
    {"op": op, "kind": kinds.get(op, "other"), "seconds": s}
    for op, s in list(median_seconds(by_op_runs).items())[:20]
  ]
  for row in top[:10]:
    print(f"  {row['op'][:40]:40s} {row['kind']:20s} {row['seconds'] * 1e3:8.1f} ms")
  suffix = "" if args.batch is None else f"_b{batch_size}"
  common.write_json(
    f"profile_train_step_{name}{suffix}",
    args.preset,
    {
      "config": name,
      "batch": batch_size,
      "source_length": length,
      "target_length": length,
      "flops_per_step": train_flops(config, batch_size, length, length),
      "runs": args.runs,
      "statistic": "median over the traced steps",
      "op_seconds_total": total,
      "op_seconds_total_per_run": totals,
      "seconds_by_kind": by_kind,
      "top_ops": top,
    },
    args.out,
  )


if __name__ == "__main__":
  sys.exit(main())
