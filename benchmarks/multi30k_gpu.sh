#!/usr/bin/env bash
# The GPU half of the Multi30k quality check in one command (about 8 minutes on one H100/H200):
#   1. `python train.py --config multi30k_gpu`, timed as a whole; its log gives the split of the
#      minutes (data and tokenizer, compile, training, final evaluation and beam search);
#   2. its BLEU-against-time curve (benchmarks/time_to_bleu.py);
#   3. the Transformer against the LSTM + attention baseline for the same training budget on the
#      same GPU (benchmarks/quality_vs_time.py).
# Results, with the device in their names, go to OUT (default benchmarks/results). Any further
# arguments go to train.py, e.g. `--config.num_train_steps=20` for a dry run on a CPU.
#
#   bash benchmarks/multi30k_gpu.sh [OUT] [train.py overrides ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
shift || true
budget_s=${QUALITY_BUDGET_S:-120}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
device=$(python -c "from benchmarks.common import device_slug; print(device_slug())")

start=$(date +%s.%N)
python train.py --config multi30k_gpu --workdir "$work/run" "$@" 2>&1 | tee "$work/train.log"
end=$(date +%s.%N)
python - "$work/train.log" "$start" "$end" > "$out/multi30k_gpu_minutes_$device.json" <<'PY'
import datetime, json, re, sys

log, start, end = open(sys.argv[1]).read(), float(sys.argv[2]), float(sys.argv[3])
day = datetime.datetime.fromtimestamp(start).date()


def at(pattern):  # seconds since the start of the last log line matching `pattern`
    stamps = [m.group(1) for m in re.finditer(r"^(\d\d:\d\d:\d\d) " + pattern, log, re.M)]
    if not stamps:
        return None
    clock = datetime.datetime.combine(day, datetime.time.fromisoformat(stamps[-1]))
    return clock.timestamp() - start


first = re.search(r"first training batch ([\d.]+) s after .* done at ([\d.]+) s", log)
trained, written, scored = at(r"step (\d+)/\2 "), at(r"model written"), at(r"test_\S+: BLEU")
split = {
    "wall_s": end - start,
    "data_and_tokenizer_s": float(first[1]) if first else None,
    "compile_first_step_s": float(first[2]) - float(first[1]) if first else None,
    "training_s": trained - float(first[2]) if first and trained else None,
    "averaging_export_evaluation_and_beam_search_s": scored - trained if trained and scored else None,
    "test_bleu": {m[0]: float(m[1]) for m in re.findall(r"^(test_\S+): BLEU = ([\d.]+)", log, re.M)},
}
print(json.dumps(split, indent=1))
PY
cat "$out/multi30k_gpu_minutes_$device.json"
cp "$work/train.log" "$out/multi30k_gpu_train_$device.log"
python -m benchmarks.time_to_bleu --name multi30k_gpu "multi30k_gpu=$work/run" --out "$out"
python -m benchmarks.quality_vs_time --budget_s "$budget_s" --out "$out"
