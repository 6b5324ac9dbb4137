#!/usr/bin/env bash
# GPU suite for ONE call of the device tool (budget 7.5 minutes on an H100/H200, install included):
#   1. pip install --no-deps --no-build-isolation -e .   (the image has torch/triton/transformers)
#   2. pytest tests/test_flash_attn.py tests/test_pooling_kernels.py -q   (compiled kernels)
#   3. benchmarks/bench_encode.py --quick, bench_attention.py --quick, bench_pooling.py --quick,
#      bench_first_embedding.py (fresh-process compile + autotune stall, cold vs warm Triton cache),
#      bench_train.py --quick (MNTP and SimCSE steps, 1B shapes, packed vs HF, tokens/s and peak memory)
#   4. prints each ratio against its target; copies results (JSON, PNG) to $OUT/results, logs go
#      to $OUT/logs (a temporary folder without $OUT).
#
# With the device tool (files written under $OUT come back):
#   run(command="bash benchmarks/gpu_suite.sh", timeout_s=540)
# Nothing needs to be carried: random weights, no downloads. Every step runs under `timeout`, so a
# hang costs only that step's cap; the whole suite stops starting steps once SUITE_BUDGET_S
# (default 450 s) is spent. SUITE_FULL=1 drops --quick (longer: run it alone, not in the 6-minute call).
# Exit status: 0 when every step passed, else 1 (the summary still prints).
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${SUITE_BUDGET_S:-450}
QUICK=--quick
[ "${SUITE_FULL:-0}" = 1 ] && QUICK=
LOGS=${OUT:-$(mktemp -d)}/logs
mkdir -p "$LOGS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS=()
FAILED=0

# step NAME CAP_SECONDS COMMAND...: run with a time cap (never past the suite budget), log to $LOGS/NAME.log
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        STATUS+=("$name: skipped (suite budget spent)")
        FAILED=1
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== $name (cap ${cap}s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$cap" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    case $rc in
        0) STATUS+=("$name: ok (${took}s)") ;;
        124|137) STATUS+=("$name: TIMED OUT after ${took}s (cap ${cap}s)"); FAILED=1 ;;
        *) STATUS+=("$name: FAILED rc=$rc (${took}s)"); FAILED=1 ;;
    esac
}

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/environment.log"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$LOGS/environment.log"

step install 90 "$PY" -m pip install --no-deps --no-build-isolation -q -e .
step kernel-tests 130 "$PY" -m pytest tests/test_flash_attn.py tests/test_pooling_kernels.py -q -p no:cacheprovider
# the headline (encode vs the official-style reference) first, so a slow step cannot starve it
step bench-encode 150 "$PY" benchmarks/bench_encode.py $QUICK
step bench-attention 90 "$PY" benchmarks/bench_attention.py $QUICK
step bench-pooling 70 "$PY" benchmarks/bench_pooling.py $QUICK
step first-embedding 60 "$PY" benchmarks/bench_first_embedding.py $QUICK
step bench-train 100 "$PY" benchmarks/bench_train.py $QUICK

echo
echo "=== summary ($(($(date +%s) - START)) s in all)"
printf '%s\n' "${STATUS[@]}" | tee "$LOGS/steps.txt"
"$PY" benchmarks/suite_summary.py benchmarks/results | tee "$LOGS/summary.txt"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results"
    cp benchmarks/results/*.json benchmarks/results/*.png "$OUT/results/" 2>/dev/null
    echo "results in $OUT/results, logs in $LOGS"
else
    echo "logs in $LOGS"
fi
exit $FAILED
