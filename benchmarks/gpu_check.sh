#!/usr/bin/env bash
# The train step on a GPU in one command (about 5 minutes on one H100/H200, at most 6):
#   1. the shared peer harness at gpu_base in bfloat16, paired rounds: the Flax examples/wmt model,
#      this project with its default flags, PyTorch eager (.bench/gpu_peers.sh);
#   2. `python -m benchmarks.train_mfu --rows base:384:64` with default flags: step time and MFU
#      against the bfloat16 matmul measured in the same process;
#   3. a 5-step jax.profiler trace of that step, kernel by kernel: the ten most expensive kernels
#      and the time per group (benchmarks/kernel_profile.py);
#   4. only with AUTO_ROW=1 (about 75 s more): train_mfu's row again with --logits_dtype auto
#      --rng_impl auto (bfloat16 logits, rbg dropout bits), the candidate defaults, into OUT/auto/;
# then gpu_check_<device>.json: the numbers the step-speed issue asks for, with their thresholds.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT]
#
# OUT defaults to $OUT (the device runner's folder), else a new temporary folder. Each stage has
# its own time limit and log (OUT/*.log); a stage that fails or runs out of time is reported in
# the summary and the next one still runs.
# Needs, in the checkout, in folders git ignores (see ../shared/bench/README.md): .bench/ = a copy
# of shared/bench, and .whl/ = the Python 3.12 wheels the GPU image lacks, plus
# flax_wmt_models.py and COMMIT of the Flax example. Without .bench/ the peer stage is skipped.
# --dry-run runs every stage on this machine's CPU with tiny sizes (harness config tiny in
# float32, train_mfu's quick tiny row, the quick profile), so the script is known to work before
# device minutes go to it; its files end in _quick or _tiny and are not results.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
declare -A status

# The project's imports (tensorflow-datasets & co.) from .whl/ where the interpreter lacks them.
if ! "$python" -c "import benchmarks.train_mfu" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      .whl/*.whl || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
"$python" -c "import benchmarks.train_mfu" || { echo "the project does not import: see .whl/"; exit 1; }
device=$("$python" -c "from benchmarks.common import device_slug; print(device_slug())")
echo "gpu_check on $device -> $out"

stage() {  # stage NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local began=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  status[$name]="rc=$rc seconds=$(( $(date +%s) - began ))"
  tail -n 25 "$out/$name.log"
  echo "== $name: ${status[$name]}"
}

# 1. Peers.
if [[ -d .bench/peers ]]; then
  if (( dry )); then
    peers=matmul_jax,flax_wmt,project
    "$python" -c "import torch" 2>/dev/null && peers=$peers,torch_eager
    stage peers 600 env FLAX_WMT_MODELS="$PWD/.whl/flax_wmt_models.py" PROJECT_DIR="$PWD" \
      "$python" .bench/peers/run_train.py --config tiny --device cpu --dtype float32 \
      --matmul-n 512 --peers "$peers" --rounds 5 --warmup 1 --min-run-s 0.2 \
      --out "$out/peers_tiny.json"
    peers_json=$out/peers_tiny.json
  else
    # The harness as it is shared (matmul_jax, flax_wmt, project, torch_eager; 5 paired rounds).
    stage peers 215 env OUT="$out" PEERS_TIMEOUT=200 bash .bench/gpu_peers.sh
    peers_json=$out/peers_gpu_base_$device.json
    [[ -f $out/peers_gpu_base.json ]] && cp "$out/peers_gpu_base.json" "$peers_json"
  fi
else
  echo "== peers: skipped, no .bench/ (see ../shared/bench/README.md)"
  status[peers]="skipped: no .bench/"
  peers_json=""
fi

# 2. train_mfu, default flags.
if (( dry )); then
  stage train_mfu 400 "$python" -m benchmarks.train_mfu --preset quick --rows tiny:4:16 \
    --out "$out"
else
  stage train_mfu 85 "$python" -m benchmarks.train_mfu --rows base:384:64 --out "$out"
fi

# 3. Kernel profile; XLA's CUDA graphs off so that each kernel shows in the trace.
if (( dry )); then
  stage kernel_profile 400 "$python" -m benchmarks.kernel_profile --preset quick --out "$out"
else
  stage kernel_profile 75 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    "$python" -m benchmarks.kernel_profile --config base --batch 384 --length 64 --steps 5 \
    --out "$out"
fi

# 4. The candidate defaults (model.logits_dtype / dropout_rng "auto"), on request.
if [[ "${AUTO_ROW:-0}" == 1 ]]; then
  mkdir -p "$out/auto"
  if (( dry )); then
    stage train_mfu_auto 400 "$python" -m benchmarks.train_mfu --preset quick --rows tiny:4:16 \
      --logits_dtype auto --rng_impl auto --out "$out/auto"
  else
    stage train_mfu_auto 85 "$python" -m benchmarks.train_mfu --rows base:384:64 \
      --logits_dtype auto --rng_impl auto --out "$out/auto"
  fi
fi

# Summary: the issue's numbers next to their thresholds.
status_json=$(for k in "${!status[@]}"; do echo "$k=${status[$k]}"; done)
"$python" - "$out" "$device" "$peers_json" "$(( $(date +%s) - start ))" "$dry" "$status_json" \
  <<'PY'
import glob, json, statistics, sys
from pathlib import Path

out, device, peers_json, wall, dry, status = sys.argv[1:7]
summary = {"device": device, "dry_run": dry == "1", "wall_s": int(wall),
           "stages": dict(line.split("=", 1) for line in status.splitlines() if line)}
if peers_json and Path(peers_json).is_file():
    peers = json.loads(Path(peers_json).read_text())["peers"]
    row = {}
    for name, p in peers.items():
        row[name] = {k: p.get(k) for k in ("median_step_s", "tokens_per_s", "mfu_pct",
                                            "paired_ratio_vs_flax_wmt", "compile_total_s")}
    summary["peers"] = row
    ratio = row.get("project", {}).get("paired_ratio_vs_flax_wmt")
    summary["project_vs_flax_paired"] = {"value": ratio, "needs": 1.25,
                                         "met": ratio is not None and ratio >= 1.25}
def mfu_row(folder):
    files = glob.glob(f"{folder}/train_mfu_*.json")
    if not files:
        return None
    r = json.loads(Path(files[0]).read_text())["results"][-1]
    row = {k: r.get(k) for k in ("config", "batch", "mfu", "tokens_per_s",
                                 "resolved_logits_dtype", "dropout_rng_impl")}
    row["step_ms"] = r["timing"]["median_s"] * 1e3
    row["compile_s"] = r["timing"].get("compile_s")
    return row


row = mfu_row(out)
if row:
    summary["train_mfu"] = row
    summary["mfu_vs_measured_bf16_matmul"] = {"value": row["mfu"], "needs": 0.45,
                                              "met": row["mfu"] >= 0.45}
if mfu_row(f"{out}/auto"):
    summary["train_mfu_auto"] = mfu_row(f"{out}/auto")
profiles = glob.glob(f"{out}/kernel_profile_*.json")
if profiles:
    record = json.loads(Path(profiles[0]).read_text())
    summary["kernel_profile"] = {
        "ms_per_step_by_group": {g: s * 1e3 for g, s in record["seconds_per_step_by_group"].items()},
        "top_kernels": [(k["hlo_op"], k["group"], round(k["seconds_per_step"] * 1e3, 3))
                        for k in record["top_kernels"]],
    }
name = f"gpu_check_{device}{'_dry_run' if dry == '1' else ''}.json"
Path(out, name).write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
print(f"wrote {Path(out, name)}")
PY
