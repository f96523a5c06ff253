#!/usr/bin/env bash
# The GPU numbers still owed (issue 18, item 5; benchmarks/README.md "GPU numbers still owed"), in ONE script that
# fits one lent device call: 15 minutes of device time per session, at most 10 per command.
#
#   bash benchmarks/gpu_all.sh                 # on a CUDA machine: the real collection, 8 minutes at most
#   DRY_RUN=1 bash benchmarks/gpu_all.sh       # on CPU, smallest sizes / --quick: proves every step and flag
#   bash benchmarks/gpu_all.sh --dry-run       # the same
#
# Steps, most valuable first, each under its own `timeout` (seconds; override with T_<STEP>=..., e.g.
# T_KERNEL_TESTS=200) and all of them inside a total budget of GPU_ALL_BUDGET_S (default 480 = 8 minutes, counted from
# the script's start; a step gets at most what is left less the 10 s that `timeout -k 10` may add, and is skipped
# when under 20 s is left). A lent device has 15 minutes in all, a few of them its start: the GPU limits below add up
# to 450 s, 30 s under the budget for the checks before the first step, so the last step runs too:
#
#   kernel_tests         110 s  python -m pytest tests/kernels -q [-n 8 when pytest-xdist is there: the kernels compile
#                               in parallel] (dry run: tests/kernels/test_dispatch.py but its torch.compile and
#                               subprocess tests)
#   triton_kernels        85 s  python benchmarks/triton_kernels.py --device cuda --no-compile --repeats 5 (logits and
#                               fused head fwd; attention fwd and fwd+bwd; the torch.compile rows are left out:
#                               inductor compiles on a fresh machine cost more than the step's limit)
#   triton_kernels_grad   55 s  python benchmarks/triton_kernels.py --device cuda --grad --only logits,head --no-compile
#                               --repeats 5
#   monitor_overhead      70 s  python benchmarks/monitor_overhead.py --all --model gpt-small --device cuda --steps 30
#                               --rounds 2 --every 10 (amortised at every 10 and every 50 from the same medians)
#   spectral              45 s  python benchmarks/spectral.py --device cuda --exact-max-n 10000
#   rollback              40 s  python benchmarks/rollback.py --model gpt-small --device cuda --repeats 3 (the rollback
#                               guard's cost)
#   fsdp1_tests           45 s  python -m pytest <the FSDP1 CUDA tests that exist> -q -rs (issue 13: Lightning's
#                               FSDPStrategy on one GPU; tests/callbacks/test_fsdp1_cuda.py,
#                               tests/regularizers/test_sigma_fsdp1_cuda.py; on CPU they skip but for their CPU
#                               checks), and the rollback guard's CUDA test
#
# Output, in $OUT (default ./gpu_out when OUT is unset; at most 9 files, flat, so a device call brings all back):
#   nvidia-smi.txt   the `nvidia-smi -L` line(s) (the card's name), or why there is none
#   <step>.txt       each step's whole output (stdout + stderr): its table(s)
#   summary.txt      one line per step: ok / FAILED (rc) / TIMEOUT / SKIPPED, seconds, limit, and under a step that
#                    did not pass the last 20 lines of its output (indented); then the card
# A failed or timed-out step does not stop the script; it exits 0 when every step is ok, else 1.
#
# Needs only what the device image has: bash, coreutils `timeout`, python3 with torch, lightning, triton, pytest
# (no wandb: WANDB_MODE=disabled and nothing here imports it; no network). PYTHON=... picks the interpreter.
# On a lent device, through the `run` tool (timeout_s ~540 leaves the script's 480 s plus start-up):
#   run(command="bash benchmarks/gpu_all.sh", timeout_s=540)      # the tables come back from $OUT
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_all.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done
case "$DRY_RUN" in 0|"") DRY_RUN=0 ;; *) DRY_RUN=1 ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-./gpu_out}
mkdir -p "$OUT_DIR" || { echo "gpu_all.sh: cannot create the output folder '$OUT_DIR'" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_ALL_BUDGET_S:-480}
SUMMARY="$OUT_DIR/summary.txt"

cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true
unset ENTROTRAIN_IMPL  # impl="auto": the Triton kernels on CUDA

if [ "$DRY_RUN" = 1 ]; then
    MODE="dry run (CPU, smallest sizes / --quick)"
    DEV=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    MODE="GPU collection"
    DEV=cuda
fi

{
    echo "# gpu_all.sh: $MODE, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET} s"
    echo "# commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown), python: $PY"
} > "$SUMMARY"

START=$SECONDS  # the budget counts from here: the checks below are part of the 8 minutes

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L > "$OUT_DIR/nvidia-smi.txt" 2>&1; then
    :
else
    echo "nvidia-smi -L: not available on this machine ($MODE)" > "$OUT_DIR/nvidia-smi.txt"
fi

if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        >/dev/null 2>&1; then
    echo "NO CUDA: $PY sees no CUDA device (torch.cuda.is_available() is False). Run DRY_RUN=1 for the CPU check." \
        | tee -a "$SUMMARY" >&2
    exit 1
fi

FAILED=0

# the FSDP1 CUDA tests that exist in this checkout (one may land later than this script)
FSDP1_TESTS=()
for f in tests/callbacks/test_fsdp1_cuda.py tests/regularizers/test_sigma_fsdp1_cuda.py; do
    [ -f "$f" ] && FSDP1_TESTS+=("$f")
done
[ "${#FSDP1_TESTS[@]}" -gt 0 ] || FSDP1_TESTS=(tests/callbacks/test_fsdp1_cuda.py)  # never a bare `pytest` (all tests)
# the rollback guard's CUDA test (pinned host buffers, queued copies) runs in the same pytest call
ROLLBACK_CUDA=tests/callbacks/test_rollback_state.py
[ -f "$ROLLBACK_CUDA" ] && FSDP1_TESTS+=("$ROLLBACK_CUDA::test_cuda_restore_and_trajectory_match_a_copy_taken_at_the_take")

# step NAME LIMIT_S CMD...: run CMD under `timeout`, its output into $OUT/NAME.txt, one line into the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local var="T_${name^^}"
    limit=${!var:-$limit}
    local left=$((BUDGET - (SECONDS - START) - 10))  # 10 s: what `timeout -k 10` may add past the limit
    if [ "$left" -lt 10 ]; then
        printf '%-20s %-12s %5s s  (limit %s s)  %s\n' "$name" "SKIPPED" 0 "$limit" "total budget spent" >> "$SUMMARY"
        echo "[gpu_all] $name: SKIPPED (total budget of ${BUDGET} s spent)"
        FAILED=1
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left  # never 0: `timeout 0` would mean no limit at all
    echo "[gpu_all] $name (limit ${limit} s): $*"
    local t0=$SECONDS rc
    {
        echo "\$ $*"
        timeout -k 10 "$limit" "$@"
    } > "$OUT_DIR/$name.txt" 2>&1
    rc=$?
    local took=$((SECONDS - t0)) status
    case $rc in
        0) status=ok ;;
        124|137) status=TIMEOUT ;;
        *) status="FAILED($rc)" ;;
    esac
    [ "$rc" = 0 ] || FAILED=1
    printf '%-20s %-12s %5s s  (limit %s s)  %s\n' "$name" "$status" "$took" "$limit" "$*" >> "$SUMMARY"
    echo "[gpu_all] $name: $status in ${took} s"
    if [ "$rc" != 0 ]; then
        tail -n 20 "$OUT_DIR/$name.txt" | sed 's/^/    | /' >> "$SUMMARY"
        tail -n 5 "$OUT_DIR/$name.txt" | sed 's/^/    /'
    fi
}


if [ "$DRY_RUN" = 1 ]; then
    # the kernel step's plumbing only: the torch.compile and subprocess tests of test_dispatch.py run in CI anyway
    step kernel_tests 60 "$PY" -m pytest tests/kernels/test_dispatch.py -q -p no:cacheprovider \
        -k "not torch_compile and not imports_no_kernel"
    step triton_kernels 60 "$PY" benchmarks/triton_kernels.py --device cpu --quick --threads 1
    step triton_kernels_grad 60 "$PY" benchmarks/triton_kernels.py --device cpu --quick --threads 1 --grad \
        --only logits,head --no-compile
    step monitor_overhead 60 "$PY" benchmarks/monitor_overhead.py --all --model tiny --device cpu --quick --threads 1
    step spectral 60 "$PY" benchmarks/spectral.py --device cpu --quick --threads 1 --exact-max-n 10000
    step rollback 60 "$PY" benchmarks/rollback.py --quick
    step fsdp1_tests 60 "$PY" -m pytest "${FSDP1_TESTS[@]}" -q -rs -p no:cacheprovider
else
    # pytest-xdist when the interpreter has it (the device image does): the kernel tests compile in parallel
    XDIST=()
    "$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 8)
    step kernel_tests 110 "$PY" -m pytest tests/kernels -q -rfEs --durations=10 -p no:cacheprovider \
        ${XDIST[@]+"${XDIST[@]}"}
    step triton_kernels 85 "$PY" benchmarks/triton_kernels.py --device cuda --no-compile --repeats 5
    step triton_kernels_grad 55 "$PY" benchmarks/triton_kernels.py --device cuda --grad --only logits,head \
        --no-compile --repeats 5
    step monitor_overhead 70 "$PY" benchmarks/monitor_overhead.py --all --model gpt-small --device cuda \
        --steps 30 --rounds 2 --every 10
    step spectral 45 "$PY" benchmarks/spectral.py --device cuda --exact-max-n 10000
    step rollback 40 "$PY" benchmarks/rollback.py --model gpt-small --device cuda --repeats 3
    step fsdp1_tests 45 "$PY" -m pytest "${FSDP1_TESTS[@]}" -q -rs -p no:cacheprovider
fi

{
    echo "# total $((SECONDS - START)) s of ${BUDGET} s; $([ "$FAILED" = 0 ] && echo 'all steps ok' || echo 'NOT all ok')"
    echo "# card: $(head -n 1 "$OUT_DIR/nvidia-smi.txt")"
} >> "$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
