#!/usr/bin/env bash
# Run the whole benchmark set on whatever device is present (CUDA when torch sees one, else
# the CPU), and write the results under benchmarks/results/ (git-ignored).
#
#   bash benchmarks/run_all.sh                    # CUDA if present, else CPU
#   bash benchmarks/run_all.sh --device cpu --threads 1   # what docs/benchmarks.md shows
#   bash benchmarks/run_all.sh --quick            # about a minute: smoke run
#   COMPILE=1 bash benchmarks/run_all.sh          # add torch.compile rows (slow warm-up on CPU)
#
# Extra arguments go to bench_throughput.py and bench_dataloading.py (the flags they share:
# --device, --quick, --threads). PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"

device="$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[$i]}" == "--device" ]]; then device="${args[$((i + 1))]}"; fi
done
extra=()
if [[ "${COMPILE:-0}" == "1" ]]; then extra+=(--compile); fi

start=$(date +%s)
echo "== tiling ($device)"
"$PYTHON" benchmarks/bench_tiling.py --device "$device" --out "$OUT/tiling.json"
echo "== throughput ($device)"
"$PYTHON" benchmarks/bench_throughput.py --device "$device" "${extra[@]}" "$@" \
    --out "$OUT/throughput.json"
echo "== data loading (CPU, one core)"
"$PYTHON" benchmarks/bench_dataloading.py "$@" --out "$OUT/dataloading.json"
echo "== all done in $(($(date +%s) - start)) s; results in $OUT/"
