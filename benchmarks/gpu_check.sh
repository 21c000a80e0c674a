#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one pass with a fixed time budget: the GPU benchmark set
# (paper geometry first, since it carries the headline figure), the test suite on the GPU,
# the small geometry, tiling, and data loading on the GPU host's CPU. Each part runs under its
# own time limit, so a slow part cannot take the others with it, and its log and result files
# are written as it goes.
#
#   bash benchmarks/gpu_check.sh [WORKDIR]        # default WORKDIR: benchmarks/results/gpu
#
# Environment:
#   PYTHON   interpreter (default: python3)
#   ARCHIVE  if set, a .tar.gz of WORKDIR is rewritten there after every part (so a run that
#            is killed from outside still leaves everything measured up to then)
#   LIMITS   "paper small tests tiling loading" seconds (default: "230 150 130 30 40")
#   PARTS    which parts to run, in order (default: "env paper tests small tiling loading")
#
# The full run takes about 9 minutes on one H100/H200 with 16 CPU cores.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-python3}"
read -r L_PAPER L_SMALL L_TESTS L_TILING L_LOADING <<<"${LIMITS:-230 150 130 30 40}"
PARTS="${PARTS:-env paper tests small tiling loading}"
mkdir -p "$WORK"
LOG="$WORK/gpu_check.log"
export PYTHONUNBUFFERED=1

archive() {
    if [[ -n "${ARCHIVE:-}" ]]; then
        tar -czf "$ARCHIVE.tmp" -C "$WORK" . && mv "$ARCHIVE.tmp" "$ARCHIVE"
    fi
}

# part NAME LIMIT COMMAND...: run COMMAND under `timeout`, log to WORK/NAME.log, report.
part() {
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - start)) s" | tee -a "$LOG"
    tail -n 25 "$WORK/$name.log" | tee -a "$LOG"
    archive
}

env_report() {
    nvidia-smi || true
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
import timm, torchvision
print("timm", timm.__version__, "torchvision", torchvision.__version__)
EOF
    # The package itself, without touching the machine's own torch/timm.
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . ||
        echo "pip install -e . failed; the parts run from the checkout on PYTHONPATH"
    "$PYTHON" -c "import patchssl; print('patchssl', patchssl.__version__, patchssl.__file__)"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start_all=$(date +%s)
for p in $PARTS; do
    case "$p" in
    env)
        export -f env_report
        export PYTHON
        part env 120 bash -c env_report
        ;;
    paper)
        part throughput_paper "$L_PAPER" "$PYTHON" benchmarks/bench_throughput.py --device cuda \
            --geometries paper --compile --out "$WORK/throughput_paper.json"
        ;;
    small)
        part throughput_small "$L_SMALL" "$PYTHON" benchmarks/bench_throughput.py --device cuda \
            --geometries small --compile --out "$WORK/throughput_small.json"
        ;;
    tests)
        part tests "$L_TESTS" "$PYTHON" -m pytest --device cuda -n 8 -q -p no:cacheprovider \
            --junitxml "$WORK/tests.xml"
        ;;
    tiling)
        part tiling "$L_TILING" "$PYTHON" benchmarks/bench_tiling.py --device cuda --batch 256 \
            --out "$WORK/tiling.json"
        ;;
    loading)
        part dataloading "$L_LOADING" "$PYTHON" benchmarks/bench_dataloading.py --device cpu \
            --threads 1 --out "$WORK/dataloading.json"
        ;;
    *) echo "unknown part $p" | tee -a "$LOG" ;;
    esac
done
echo "== gpu_check done in $(($(date +%s) - start_all)) s" | tee -a "$LOG"
archive
