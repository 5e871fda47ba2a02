#!/usr/bin/env bash
# The prepared GPU check: build the CUDA extension, run the op test matrix on CUDA (plain pytest: the op tests are
# parametrized over the (backend, device) pairs that are built), then the GPU benchmark suite; the log, JSON, CSV,
# Markdown and PNG go to OUTDIR. Every part has its own time limit, so the whole check ends within 8 minutes on an
# H100/H200; a benchmark part cut by its limit still writes the rows it measured.
#
#   benchmarks/gpu_check.sh OUTDIR [--dry-run] [--tests "PYTEST ARGS"]
#
# Without a CUDA device, or with --dry-run, every part runs its CPU-sized subset (no build, tiny shapes) and the
# log says so: that checks the script and the GPU rows' code paths, not the GPU. PYTHON picks the interpreter
# (default: .venv/bin/python, else python3). Exit status: 0 when every part passed, 1 otherwise.
set -uo pipefail

usage() { echo "usage: benchmarks/gpu_check.sh OUTDIR [--dry-run] [--tests \"PYTEST ARGS\"]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
DRY=0
TESTS=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --tests) [[ $# -ge 2 ]] || usage; TESTS=$2; shift ;;
        *) usage ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOG=$OUT/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

if [[ $($PYTHON -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null) != 1 && $DRY == 0 ]]; then
    echo "no CUDA device here: dry run (the CPU-sized subset of every part; no GPU number is measured)"
    DRY=1
fi
[[ $DRY == 1 ]] && echo "DRY RUN on CPU: tiny shapes, no CUDA build; checks the script and the code paths only"
$PYTHON - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
EOF

FAILED=()
START=$(date +%s)
# the whole check, so that it ends within 8 minutes with the start-up (a dry run on a busy CPU may take longer)
TOTAL_S=${GPU_CHECK_TOTAL_S:-$([[ $DRY == 1 ]] && echo 900 || echo 460)}
PARTIAL=()
# part NAME LIMIT_S CMD...: run CMD under a time limit, cut to what is left of TOTAL_S (SIGINT first: t3d-bench
# then writes what it measured)
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((START + TOTAL_S - $(date +%s)))
    echo
    if [[ $left -lt 15 ]]; then
        echo "== $name: skipped, out of time (${left}s of ${TOTAL_S}s left)"
        FAILED+=("$name (out of time)")
        return
    fi
    [[ $limit -gt $left ]] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=30 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0))s$([[ $rc == 124 ]] && echo ' (time limit)')"
    if [[ $rc == 124 && $name == bench-* ]]; then
        PARTIAL+=("$name")  # its JSON/Markdown hold the rows measured before the limit ("complete": false)
    elif [[ $rc != 0 ]]; then
        FAILED+=("$name (exit $rc)")
    fi
}
BENCH=("$PYTHON" -m benchmarks --no-table)

if [[ $DRY == 1 ]]; then
    echo "== build: skipped in a dry run (the CPU extension is built by make setup / make build)"
    part tests 240 "$PYTHON" -m pytest -q -x ${TESTS:--m "not slow" tests/test_ttl.py tests/test_dense_block.py}
    # 1 thread: on a shared CPU, a second thread mostly measures the scheduler
    DRYBENCH=("${BENCH[@]}" --device cpu --threads 1 --repeats 3 --time-budget 0.5 --no-compile --precision fp32,bf16)
    part bench-ops 200 "${DRYBENCH[@]}" --shape ttl:1,8,4,6,6:1,3:6 --shape dense_block:1,8,4,6,6:2 \
        --passes forward,train --out "$OUT/ops"
    part bench-model 200 "${DRYBENCH[@]}" --shape model:tiny:2,16,32,32 --max-batch --out "$OUT/model"
else
    # the build also compiles the CPU kernels; MAX_JOBS: ninja's parallel compiles
    part build 110 env MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace -q
    "$PYTHON" -c "import t3d_kernels as tk; print('backends:', {op: tk.backends(op) for op in ('ttl', 'dense_block')})"
    # shellcheck disable=SC2086  # TESTS is a list of pytest arguments
    part tests 120 "$PYTHON" -m pytest -q -x -rs \
        ${TESTS:-$(ls tests/test_ttl*.py tests/test_dense_block*.py tests/test_fuzz*.py tests/test_regressions.py 2>/dev/null)}
    # the ops (TTL, dense block) at batch 8 and 32 in fp32 (TF32 convs) and bf16 autocast, GPU kernel time
    part bench-ops 70 "${BENCH[@]}" --device cuda --ops ttl,dense_block --batches 8,32 --precision fp32,bf16 \
        --no-compile --timer kernel --out "$OUT/ops"
    # whole T3D-121 at 32x112x112, batch 8/16/32, with torch.compile (inference) at batch 8; CUDA-event time
    part bench-model-112 80 "${BENCH[@]}" --device cuda --precision fp32,bf16 --compile-batches 8 \
        --shape model:8,32,112,112 --shape model:16,32,112,112 --shape model:32,32,112,112 --out "$OUT/model112"
    # at the paper's 32x224x224, and the largest training batch that fits, eager vs fused
    part bench-model-224 70 "${BENCH[@]}" --device cuda --precision fp32,bf16 --no-compile --max-batch \
        --shape model:8,32,224,224 --shape model:16,32,224,224 --shape model:32,32,224,224 --out "$OUT/model224"
fi

echo
for dir in "$OUT"/*/; do
    [[ -f $dir/latest.md ]] || continue
    echo "== $(basename "$dir"): $dir/latest.md"
    cat "$dir/latest.md"
done
echo "== gpu_check: $(($(date +%s) - START))s in all; results in $OUT"
[[ ${#PARTIAL[@]} -gt 0 ]] && echo "== cut by their time limit (partial results): ${PARTIAL[*]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "== FAILED: ${FAILED[*]}"
    exit 1
fi
echo "== every part passed"
