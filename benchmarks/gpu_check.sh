#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one pass of under 9 minutes, most important first: the
# engine end to end at the paper geometry (bf16 + channels_last, eager and compiled), the step
# and its bf16 ratio to the bare backbone, the small geometry and GPU JPEG decoding. Each part
# runs under its own `timeout` (the default parts' budgets sum to 495 s; on one H100 the
# compiled engine alone took 167 s, 98 s of it compiling), and writes its log and result file
# as it goes, so a part that is killed keeps what it measured and cannot take the others with
# it. The test suite on the GPU is a part of its own, run separately: PARTS=tests (80 s).
#
# Parts not in the default PARTS (name them to run them): `engine_paper_sync`, the engine at the
# paper geometry with its checkpoints written in the training thread (train.async_checkpoint
# false; the default writes them in the background on a GPU); `engine_paper_long`, the engine at the
# paper geometry with epochs of 10,000 images (does the loop's gap to the step shrink with the
# epoch's length: a per-epoch refill of the loader, or a per-step cost?); `profile_paper`, where
# the step's time goes against the bare backbone's (profile_step.py: time per step, device busy
# time, host-device syncs, top operators); `sync`, the GPU test that a pretraining step never
# waits for the device; `liftoff`, the jigsaw
# lift-off levers on real photographs (bench_jigsaw_liftoff.py, every lever at the 300 steps of
# the goal, then the best of them for 2,000 steps), `recipe`, the from-scratch fine-tuning recipes
# of bench_finetune_recipe.py on the transfer benchmark's data, and `transfer`, the transfer
# benchmark (bench_transfer.py) at 192 px images and 64 px patches for the two smallest label
# budgets: the linear probe first, then the attention rows from scratch and pretrained.
#
#   bash benchmarks/gpu_check.sh [WORKDIR]        # default WORKDIR: benchmarks/results/gpu
#   DRY=1 bash benchmarks/gpu_check.sh /tmp/dry   # every command on the CPU in --quick mode
#
# Environment:
#   PYTHON   interpreter (default: python3)
#   ARCHIVE  if set, a .tar.gz of WORKDIR is rewritten there after every part
#   PARTS    which parts to run, in order (default: env engine_paper engine_paper_compiled
#            step_paper engine_small step_small decode)
#   LIMIT_SCALE  multiplies every part's time limit (default 1; 10 with DRY=1)
#   DRY      1: run every part's command with --device cpu --quick (no GPU needed; the
#            test suite part is skipped; TORCHDYNAMO_DISABLE=1, so torch.compile is called
#            but compiles nothing): checks that the script and its commands work
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-python3}"
TRANSFER_ROWS_LIMIT="${TRANSFER_ROWS_LIMIT:-100}"
PARTS="${PARTS:-env engine_paper engine_paper_compiled step_paper engine_small step_small decode}"
mkdir -p "$WORK"
LOG="$WORK/gpu_check.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${DRY:-0}" == "1" ]]; then
    # torch.compile's calls run, but compile nothing: minutes on a CPU otherwise.
    export TORCHDYNAMO_DISABLE=1
    # On a CPU the parts' GPU time limits do not apply: ten times as long.
    LIMIT_SCALE="${LIMIT_SCALE:-10}"
    DEV=(--device cpu --quick)
    DEVICE=(--device cpu)
    ENGINE_PAPER=(--geometry tiny)
    ENGINE_SMALL=(--geometry tiny)
    ENGINE_LONG=(--geometry tiny --images 16)
    STEP_PAPER=(--geometries tiny --batches 2 --ratio-batch 2 --ratio-variants fp32)
    STEP_SMALL=("${STEP_PAPER[@]}")
    DECODE=(--count 2 --original-size 640 424 --repeats 1)
    PROFILE_PAPER=(--quick)
    LIFTOFF_SWEEP=(--variants defaults+no_gap defaults+small_gap --steps 4 --log-every 2)
    LIFTOFF_LONG=(--steps 4 --log-every 2)
    RECIPE=(--variants base --budgets 8 --images 32 --test-patients 20)
    TRANSFER=(--threads 2 --image-size 96 --patch-size 32 --num-unlabeled 32 --test-patients 10
        --budgets 8 --pretrain-epochs 1 --finetune-images 16 --n-boot 20)
else
    DEV=(--device cuda)
    DEVICE=(--device cuda)
    # Paper geometry: 512 px, 3x3 patches of 153 px, ResNet50, bf16 + channels_last, B = 64.
    ENGINE_PAPER=(--geometry paper --variant bf16-cl --batch 64 --epochs 3 --unique 32)
    ENGINE_SMALL=(--geometry small --variant bf16-cl --batch 128 --epochs 3 --unique 32)
    ENGINE_LONG=(--geometry paper --variant bf16-cl --batch 64 --epochs 2 --unique 32 --images 10000)
    STEP_PAPER=(--geometries paper --modes pretrain --batches 64 --sweep bf16-cl --compare ""
        --ratio-batch 64 --ratio-variants bf16-cl --workers 8 --repeats 3 --min-time 0.3)
    STEP_SMALL=(--geometries small --modes pretrain --batches 128 --sweep bf16-cl --compare ""
        --ratio-batch 128 --ratio-variants bf16-cl --workers 8 --repeats 3 --min-time 0.3)
    DECODE=(--count 8 --repeats 3 --gpu-batch 64)
    PROFILE_PAPER=(--geometry paper --variant bf16-cl --batch 64 --steps 5 --top 40)
    # The relation head (the default) against the assignment head, and the levers around it
    # not yet measured on a GPU; the earlier sweeps' levers are listed in docs/benchmarks.md.
    LIFTOFF_SWEEP=(--variants defaults assignment_head defaults+per_patch_norm no_image_defences
        no_curriculum defaults+crop25 defaults+no_gap defaults+sgd --steps 300 --log-every 100)
    LIFTOFF_LONG=(--steps 2000 --log-every 250)
    RECIPE=(--variants base encoder_norm lr3e-4 no_dropout pooled_head group_norm
        --budgets 8 32 128 --images 4000 --test-patients 500)
    # The transfer benchmark at 192 px images and 64 px patches, the two smallest budgets.
    TRANSFER=(--threads 0 --image-size 192 --patch-size 64 --budgets 8 16 --pretrain-epochs 20)
fi
# The transfer part measures the library's default classifier (softmax attention pooling) on
# ImageNet-normalised input, from a jigsaw that keeps each tile's brightness and colour
# (docs/benchmarks.md, "The classifier that finds the lesion").
TRANSFER+=(--attention softmax --head pooled --input-norm encoder
    --pretext-options per_patch_norm=false)

# The lift-off photographs from a cache file where one was prepared (scikit-image not needed).
PHOTO_ARGS=()
if [[ -f .bench_cache/photos.npz ]]; then
    PHOTO_ARGS=(--photos .bench_cache/photos.npz)
fi

archive() {
    if [[ -n "${ARCHIVE:-}" ]]; then
        # the results and logs; not the end-to-end runs' images and checkpoints
        tar -czf "$ARCHIVE.tmp" --exclude='./e2e_*' -C "$WORK" . && mv "$ARCHIVE.tmp" "$ARCHIVE"
    fi
}

# part NAME LIMIT COMMAND...: run COMMAND under `timeout`, log to WORK/NAME.log, report.
part() {
    local name=$1 limit=$(($2 * ${LIMIT_SCALE:-1}))
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - start)) s" | tee -a "$LOG"
    tail -n 12 "$WORK/$name.log" | tee -a "$LOG"
    archive
}

env_report() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PYTHON" - <<'EOF'
import os, platform, torch, timm, torchvision
import patchssl
from patchssl.data import default_workers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "timm", timm.__version__, "torchvision", torchvision.__version__, "patchssl", patchssl.__file__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
print("cores", len(os.sched_getaffinity(0)), "engine loader workers (cuda)", default_workers("cuda"))
EOF
}

start_all=$(date +%s)
for p in $PARTS; do
    case "$p" in
    env)
        export -f env_report
        export PYTHON
        part env 20 bash -c env_report
        ;;
    engine_paper) # the headline: patchssl pretrain end to end against the step, eager
        part engine_paper 90 "$PYTHON" benchmarks/bench_engine.py "${DEV[@]}" "${ENGINE_PAPER[@]}" \
            --workdir "$WORK/e2e_paper" --out "$WORK/engine_paper.json"
        ;;
    engine_paper_sync) # the same with the checkpoints written in the training thread
        part engine_paper_sync 100 "$PYTHON" benchmarks/bench_engine.py "${DEV[@]}" \
            "${ENGINE_PAPER[@]}" --async-checkpoint false --workdir "$WORK/e2e_paper" \
            --out "$WORK/engine_paper_sync.json"
        ;;
    engine_paper_compiled) # the same with train.compile (whole pretext task)
        part engine_paper_compiled 200 "$PYTHON" benchmarks/bench_engine.py "${DEV[@]}" \
            "${ENGINE_PAPER[@]}" --compile model --workdir "$WORK/e2e_paper" \
            --out "$WORK/engine_paper_compiled.json"
        ;;
    engine_paper_long) # the same as engine_paper with epochs of 10,000 images
        part engine_paper_long 110 "$PYTHON" benchmarks/bench_engine.py "${DEV[@]}" \
            "${ENGINE_LONG[@]}" --workdir "$WORK/e2e_paper_long" --out "$WORK/engine_paper_long.json"
        ;;
    step_paper) # the step, and its ratio to the bare backbone, in bf16 + channels_last
        part step_paper 60 "$PYTHON" benchmarks/bench_throughput.py "${DEV[@]}" "${STEP_PAPER[@]}" \
            --out "$WORK/throughput_paper.json"
        ;;
    profile_paper) # where the step's time goes, against the bare backbone (torch.profiler)
        part profile_paper 45 "$PYTHON" benchmarks/profile_step.py "${DEVICE[@]}" \
            "${PROFILE_PAPER[@]}" --out "$WORK/profile_paper.json"
        ;;
    sync) # the GPU test that a pretraining step never waits for the device
        if [[ "${DRY:-0}" == "1" ]]; then
            echo "== sync: skipped in DRY mode" | tee -a "$LOG"
        else
            part sync 45 "$PYTHON" -m pytest --device cuda -q -p no:cacheprovider \
                tests/test_gpu.py -k never_waits
        fi
        ;;
    engine_small)
        part engine_small 55 "$PYTHON" benchmarks/bench_engine.py "${DEV[@]}" "${ENGINE_SMALL[@]}" \
            --workdir "$WORK/e2e_small" --out "$WORK/engine_small.json"
        ;;
    step_small)
        part step_small 40 "$PYTHON" benchmarks/bench_throughput.py "${DEV[@]}" "${STEP_SMALL[@]}" \
            --out "$WORK/throughput_small.json"
        ;;
    decode) # JPEG decoding: load_image against decode_jpeg per core, and on the GPU in batches
        part decode 30 "$PYTHON" benchmarks/bench_dataloading.py "${DEV[@]}" "${DECODE[@]}" \
            --threads 1 --out "$WORK/dataloading.json"
        ;;
    liftoff) # evidence: which lever gets the 1,000-way puzzle off chance on photographs
        part liftoff_sweep 110 "$PYTHON" benchmarks/bench_jigsaw_liftoff.py "${DEVICE[@]}" \
            "${LIFTOFF_SWEEP[@]}" "${PHOTO_ARGS[@]}" --out "$WORK/liftoff_sweep.json"
        # the sweep's best lever (held-out accuracy, then training loss below chance) for longer
        best=$("$PYTHON" - "$WORK/liftoff_sweep.json" <<'EOF'
import json, math, sys
try:
    runs = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
def score(item):
    last = item[1]["log"][-1]
    return (last["held_out_acc"], math.log(last["active"]) - last["loss"])
levers = [(k, v) for k, v in runs.items() if isinstance(v, dict) and v.get("log")]
if levers:
    print(max(levers, key=score)[0])
EOF
)
        if [[ -n "$best" ]]; then
            part liftoff_long 90 "$PYTHON" benchmarks/bench_jigsaw_liftoff.py "${DEVICE[@]}" \
                --variants "$best" "${LIFTOFF_LONG[@]}" "${PHOTO_ARGS[@]}" \
                --out "$WORK/liftoff_long.json"
        fi
        ;;
    recipe) # evidence: can fine-tuning from scratch learn the synthetic task, and how
        part recipe 120 "$PYTHON" benchmarks/bench_finetune_recipe.py "${DEVICE[@]}" \
            "${RECIPE[@]}" --cache "${TMPDIR:-/tmp}/patchssl-recipe-cache" --out "$WORK/recipe.json"
        ;;
    transfer) # evidence: the probe, then +AL against +SSL+AL, at 192 px / 64 px patches
        for pool in mean max; do  # the pretraining and the patch features are cached
            part "transfer_probe_$pool" 150 "$PYTHON" benchmarks/bench_transfer.py \
                "${TRANSFER[@]}" --seeds 0 1 2 --rows --probe-pool "$pool" \
                --cache "${TMPDIR:-/tmp}/patchssl-transfer-cache" --out "$WORK/transfer_probe_$pool"
        done
        # one seed more at a time (the runs are cached): a part cut off keeps the seeds done
        for seeds in "0" "0 1" "0 1 2"; do
            # shellcheck disable=SC2086
            part "transfer_rows_s${seeds// /}" "$TRANSFER_ROWS_LIMIT" "$PYTHON" \
                benchmarks/bench_transfer.py "${TRANSFER[@]}" --seeds $seeds --rows al ssl_al \
                --no-probe --cache "${TMPDIR:-/tmp}/patchssl-transfer-cache" \
                --out "$WORK/transfer_rows_s${seeds// /}"
        done
        ;;
    tests) # separately and last: the suite on the GPU
        if [[ "${DRY:-0}" == "1" ]]; then
            echo "== tests: skipped in DRY mode" | tee -a "$LOG"
        else
            part tests 80 "$PYTHON" -m pytest --device cuda -n 8 -q -p no:cacheprovider \
                --junitxml "$WORK/tests.xml"
        fi
        ;;
    *) echo "unknown part $p" | tee -a "$LOG" ;;
    esac
done
echo "== gpu_check done in $(($(date +%s) - start_all)) s" | tee -a "$LOG"
archive
