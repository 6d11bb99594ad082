"""The train step kernel by kernel: one `jax.profiler` trace of 5 steps, summarised as the ten most
expensive kernels and the time of each group of kernels, per step.

Groups: matmul, attention, softmax/cross-entropy, layer norm, elementwise (the other fusions,
reductions such as the optimizer's and the finiteness checks included), copies/transposes,
collectives, random bits (dropout's), other (sorts, unknown custom calls).

Every kernel event of the trace names the HLO instruction it runs (its `hlo_op` stat): the GPU's
kernels on their streams, XLA:CPU's thunks on its threads. Each instruction is looked up in the
step's optimised HLO, and grouped by what it is and where it came from, the same way on both:
  * its opcode, its custom-call target (cuBLAS, cuDNN's fused attention) and the opcodes inside a
    fusion (a dot makes a fusion a matmul; only copies, transposes, slices and the like make it a
    copy);
  * the name scope of its JAX source (the HLO `op_name`): the model names its attention
    (`dot_product_attention`, `attention_weights`), its LayerNorm and the loss's passes over the
    logits (`jax.named_call`), so fused kernels of those count there whatever XLA calls them;
  * failing both, the kernel's own name (gemm, fmha, nccl, copy, transpose, ...).
A while loop's own event spans its body's kernels and is left out (they are counted); on CPU,
thunks of the two threads are summed (CPU time, which can exceed the wall time of a step).

  python -m benchmarks.kernel_profile [--config base --batch 384 --length 64] [--steps 5]
  python -m benchmarks.kernel_profile --preset quick     # tiny model, for a dry run on a CPU

On a GPU run it with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` (as benchmarks/gpu_check.sh
does) so that XLA's CUDA graphs do not hide the kernels from the trace.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.profiler import ProfileData

from benchmarks import common
from benchmarks.steps import CONFIGS, build_step, compute_dtype, random_batch
from transformer import EncoderDecoder
from transformer.train.flops import train_flops

GROUPS = (
  "matmul",
  "attention",
  "softmax/cross-entropy",
  "layer norm",
  "elementwise",
  "copies/transposes",
  "collectives",
  "random bits",
  "other",
)
COLLECTIVES = re.compile(
  r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|nccl|collective"
)
DATA_MOVEMENT = frozenset(
  (
    "copy",
    "transpose",
    "bitcast",
    "reshape",
    "broadcast",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "concatenate",
    "pad",
    "gather",
    "scatter",
    "reverse",
    "iota",
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "copy-start",
    "copy-done",
  )
)
CONTAINERS = frozenset(("while", "conditional", "call"))
RANDOM_OPS = frozenset(("rng-bit-generator", "rng", "rng-get-and-update-state"))
RANDOM_SCOPE = re.compile(r"threefry|random_bits|_bernoulli|_uniform|rng_bit")
MATMUL_KERNEL = re.compile(r"gemm|cublas|nvjet|cutlass|xmma|matmul|ynn", re.I)
ATTENTION_KERNEL = re.compile(r"fmha|flash|attention", re.I)
COPY_KERNEL = re.compile(r"copy|transpose|memcpy|memset|concatenate", re.I)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][a-z\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")


@dataclasses.dataclass(frozen=True)
class HloOp:
  """What the profile needs of one HLO instruction."""

  opcode: str
  target: str = ""  # custom_call_target, lowercase
  op_name: str = ""  # the JAX name scope of its source
  body: frozenset[str] = frozenset()  # opcodes inside a fusion (or other called computation)


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
  """Instruction name -> `HloOp`, for every instruction of an optimised HLO module's text."""
  lines: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
  computation = ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if match:
      name, opcode, rest = match.groups()
      lines[computation].append((name, opcode, rest))
  bodies = {name: frozenset(op for _, op, _ in rows) for name, rows in lines.items()}
  ops = {}
  for rows in lines.values():
    for name, opcode, rest in rows:
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      called = re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", rest)
      body = frozenset().union(*(bodies.get(c, frozenset()) for c in called))
      ops[name] = HloOp(
        opcode,
        target.group(1).lower() if target else "",
        op_name.group(1) if op_name else "",
        body,
      )
  return ops


def kernel_group(op: HloOp | None, kernel: str) -> str:
  """The group (one of `GROUPS`) of a kernel running HLO instruction `op` (None if unknown).

  Attention counts as a whole (its products, softmax and transposes alike), so that cuDNN's
  fused kernel and XLA's attention compare; a pure copy elsewhere counts as a copy even inside
  LayerNorm or the loss.
  """
  opcode = op.opcode if op else ""
  body = op.body if op else frozenset()
  target = op.target if op else ""
  scope = op.op_name if op else ""
  if COLLECTIVES.search(opcode) or COLLECTIVES.search(kernel.lower()):
    return "collectives"
  if "fmha" in target or "attention" in scope or (op is None and ATTENTION_KERNEL.search(kernel)):
    return "attention"
  matmul_kernel = (op is None or opcode in ("custom-call", "fusion")) and bool(
    MATMUL_KERNEL.search(kernel)
  )
  if (
    opcode in ("dot", "convolution")
    or body & {"dot", "convolution"}
    or any(name in target for name in ("gemm", "cublas", "matmul"))
    or matmul_kernel
  ):
    return "matmul"
  if opcode in RANDOM_OPS or body & RANDOM_OPS or RANDOM_SCOPE.search(scope):
    return "random bits"
  if opcode in DATA_MOVEMENT or (opcode == "fusion" and body and body <= DATA_MOVEMENT):
    return "copies/transposes"
  if op is None:
    return "copies/transposes" if COPY_KERNEL.search(kernel) else "other"
  if "cross_entropy" in scope:
    return "softmax/cross-entropy"
  if "layer_norm" in scope:
    return "layer norm"
  if opcode in ("custom-call", "sort", "infeed", "outfeed", "send", "recv"):
    return "other"
  return "elementwise"


def kernel_events(directory: Path, module: str = "") -> list[tuple[str, str, float]]:
  """(HLO instruction, kernel name, seconds) of every kernel event in the trace under
  `directory`: GPU stream events, and XLA:CPU thunk events. `module` keeps only the events of
  the HLO module of that name (e.g. "jit_train_step")."""
  path = sorted(Path(directory).glob("**/*.xplane.pb"))[-1]
  events = []
  for plane in ProfileData.from_file(str(path)).planes:
    on_gpu = plane.name.startswith("/device:GPU")
    if not on_gpu and not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if on_gpu and "Stream" not in line.name:
        continue  # derived lines (XLA Ops, XLA Modules) repeat the stream events
      for event in line.events:
        stats = dict(getattr(event, "stats", ()))
        if "hlo_op" not in stats or not str(stats.get("hlo_module", module)).startswith(module):
          continue
        events.append((str(stats["hlo_op"]), event.name, event.duration_ns * 1e-9))
  return events


def summarise(
  events: list[tuple[str, str, float]], ops: dict[str, HloOp], steps: int, top: int = 10
) -> dict[str, Any]:
  """Per step: seconds of each group and the `top` most expensive instructions."""
  seconds: dict[str, float] = collections.defaultdict(float)
  calls: collections.Counter[str] = collections.Counter()
  kernels: dict[str, set[str]] = collections.defaultdict(set)
  groups = {}
  for hlo_op, kernel, duration in events:
    op = ops.get(hlo_op)
    if op is not None and op.opcode in CONTAINERS:
      continue  # spans its body's kernels, which are counted themselves
    seconds[hlo_op] += duration
    calls[hlo_op] += 1
    kernels[hlo_op].add(kernel)
    groups[hlo_op] = kernel_group(op, kernel)
  total = sum(seconds.values())
  by_group = dict.fromkeys(GROUPS, 0.0)
  for hlo_op, value in seconds.items():
    by_group[groups[hlo_op]] += value
  rows = [
    {
      "hlo_op": hlo_op,
      "group": groups[hlo_op],
      "seconds_per_step": value / steps,
      "share": value / total if total else 0.0,
      "calls_per_step": calls[hlo_op] / steps,
      "kernels": sorted(kernels[hlo_op])[:3],
      "op_name": ops[hlo_op].op_name if hlo_op in ops else "",
    }
    for hlo_op, value in sorted(seconds.items(), key=lambda item: -item[1])[:top]
  ]
  return {
    "kernel_seconds_per_step": total / steps,
    "seconds_per_step_by_group": {g: v / steps for g, v in by_group.items()},
    "share_by_group": {g: (v / total if total else 0.0) for g, v in by_group.items()},
    "top_kernels": rows,
    "instructions_seen": len(seconds),
    "instructions_not_in_hlo": sum(1 for h in seconds if h not in ops),
  }


def traced_steps(compiled, state, batch, steps: int, directory: Path):
  """Runs `steps` steps under one trace; returns (state, wall seconds of the traced steps)."""
  jax.profiler.start_trace(str(directory))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  return state, wall


def profile(config, batch_size: int, length: int, steps: int) -> dict[str, Any]:
  """Compiles the project's train step (Adam, dropout on) for this model and batch shape, warms
  it up, traces `steps` steps, and summarises the trace (`summarise`)."""
  train, state = build_step(EncoderDecoder(config, rngs=nnx.Rngs(params=0, dropout=1)))
  batch = random_batch(config.vocab_size, batch_size, length, length)
  compiled, compile_s = common.compile_jitted(train.train_step, state, batch, donate_argnums=0)
  for _ in range(2):  # warm-up: first-touch allocations
    state, _ = jax.block_until_ready(compiled(state, batch))
  ops = hlo_ops(compiled.as_text())
  with tempfile.TemporaryDirectory() as directory:
    state, wall = traced_steps(compiled, state, batch, steps, Path(directory))
    events = kernel_events(Path(directory), module="jit_train_step")
  return {
    "traced_steps": steps,
    "wall_s_per_traced_step": wall / steps,
    "compile_s": compile_s,
    **summarise(events, ops, steps),
  }


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument("--config", choices=tuple(CONFIGS), default=None)
  parser.add_argument("--batch", type=int, default=None, help="pairs per step")
  parser.add_argument("--length", type=int, default=None, help="source = target length")
  parser.add_argument("--steps", type=int, default=5, help="steps in the trace")
  parser.add_argument("--scan_layers", action="store_true", help="the scanned stacks")
  args = common.parse_args(parser, argv)
  quick = args.preset == "quick"
  name = args.config or ("tiny" if quick else "base")
  batch_size = args.batch or (4 if quick else 384)
  length = args.length or (16 if quick else 64)
  # The model as train_mfu builds it: the defaults for the backend's compute dtype.
  config = CONFIGS[name](dtype=compute_dtype(), scan_layers=args.scan_layers)
  if name == "tiny":  # it has no dropout, and the dry run must see dropout's kernels too
    config = config.replace(dropout_rate=0.1)
  summary = profile(config, batch_size, length, args.steps)
  print(
    f"{name} B={batch_size} T={length}: {summary['kernel_seconds_per_step'] * 1e3:.2f} ms of "
    f"kernels per step, {summary['wall_s_per_traced_step'] * 1e3:.2f} ms wall per traced "
    f"step, compile {summary['compile_s']:.1f} s"
  )
  for group, seconds in summary["seconds_per_step_by_group"].items():
    print(f"  {group:22s} {seconds * 1e3:8.2f} ms  {summary['share_by_group'][group]:6.1%}")
  for row in summary["top_kernels"]:
    print(
      f"  {row['hlo_op'][:36]:36s} {row['group']:22s} {row['seconds_per_step'] * 1e3:8.3f} ms "
      f"x{row['calls_per_step']:.0f}  {row['kernels'][0][:40]}"
    )
  common.write_json(
    f"kernel_profile_{name}_b{batch_size}",
    args.preset,
    {
      "config": name,
      "model": dataclasses.asdict(config),
      "resolved_logits_dtype": config.resolved_logits_dtype,
      "resolved_dropout_rng": config.resolved_dropout_rng,
      "batch": batch_size,
      "source_length": length,
      "target_length": length,
      "flops_per_step": train_flops(config, batch_size, length, length),
      "groups": list(GROUPS),
      **summary,
    },
    args.out,
  )


if __name__ == "__main__":
  sys.exit(main())
