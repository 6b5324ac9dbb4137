# Shared by benchmarks/gpu_suite.sh and benchmarks/gpu_followup.sh (sourced, not run): the time-capped
# steps under one budget, the environment record, the carried wheels, and the summary + $OUT packing.
# The sourcing script sets BUDGET (seconds) first.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# python3 first: on the GPU image a plain `python3` is the one that holds PyTorch
PY=${PYTHON:-$(command -v python3 || command -v python)}
# bench_train's tokenizer and the liger-kernel wheel, which the GPU image lacks: `make gpu-carry` puts
# both in .gpu_carry (git-ignored) on the CPU machine, then run(..., carry=[".gpu_carry"])
TOKENIZER_DIR=${TOKENIZER_DIR:-.gpu_carry/tokenizer}
TOKENIZER_ARGS=()
if [ -d "$TOKENIZER_DIR" ]; then
    TOKENIZER_ARGS=(--tokenizer "$TOKENIZER_DIR")
    # the kernel tests' tiny models take it too (tests/conftest.py: smollm_tokenizer)
    export LLM2VEC_FAST_TEST_TOKENIZER=${LLM2VEC_FAST_TEST_TOKENIZER:-$(cd "$TOKENIZER_DIR" && pwd)}
fi
LOGS=${OUT:-$(mktemp -d)}/logs
mkdir -p "$LOGS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS=()
FAILED=0

# step NAME CAP_SECONDS COMMAND...: run with a time cap (never past the budget), log to $LOGS/NAME.log;
# MIN_LEFT_S=N step ...: skip the step unless N seconds of the budget are left (default 20)
step() {
    local name=$1 cap=$2
    shift 2
    if [ -n "${PLANNING:-}" ]; then
        echo "  $name: cap ${cap}s${MIN_LEFT_S:+, starts only with ${MIN_LEFT_S}s of the budget left}: $*"
        return
    fi
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "${MIN_LEFT_S:-20}" ]; then
        STATUS+=("$name: skipped (${left}s of the suite budget left, needs ${MIN_LEFT_S:-20}s)")
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

"$PY" - <<'PYEOF' 2>&1 | tee "$LOGS/environment.log"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$LOGS/environment.log"

imports_llm2vec_fast() { "$PY" -c "import llm2vec_fast.kernels, llm2vec_fast.export" 2>/dev/null; }
failed_before_install=$FAILED
step install 90 "$PY" -m pip install --no-deps --no-build-isolation -q -e .
# the image's environment may be read-only (calls have run as a non-root user): then import the
# working tree, with kernels/ and export/ linked where the install would map them
if ! imports_llm2vec_fast; then
    ln -sfn ../kernels llm2vec_fast/kernels && ln -sfn ../export llm2vec_fast/export
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if imports_llm2vec_fast; then
        # the fallback works: the failed pip install (the last status) is not a failure of the suite
        STATUS[${#STATUS[@]}-1]="install: not installed (read-only environment?), llm2vec_fast imported from the working tree"
        FAILED=$failed_before_install
    else
        STATUS+=("install: llm2vec_fast imports neither installed nor from the working tree")
    fi
fi
# liger-kernel is pure Python but the image has no network: its wheel comes in .gpu_carry (make gpu-carry)
for wheel in .gpu_carry/liger_kernel-*.whl; do
    [ -f "$wheel" ] || continue
    if ! "$PY" -m pip install --no-deps -q "$wheel"; then
        "$PY" -m pip install --no-deps -q --target "${TMPDIR:-/tmp}/gpu-suite-site" "$wheel" &&
            export PYTHONPATH="${TMPDIR:-/tmp}/gpu-suite-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
done
has_liger() { "$PY" -c "import liger_kernel" 2>/dev/null; }
LIGER_MISSING="no liger-kernel on this image: make gpu-carry, then carry .gpu_carry"

# plan_and_run STEPS_FUNCTION: print what the function will run (each step, its cap, its command) and
# the budget, then run it
plan_and_run() {
    local kept=("${STATUS[@]}") failed=$FAILED
    echo "=== plan: $((BUDGET - ($(date +%s) - START)))s of the ${BUDGET}s budget left; a step that would pass it is cut short, a later one skipped"
    PLANNING=1 "$1"
    local note
    for note in "${STATUS[@]:${#kept[@]}}"; do echo "  $note"; done  # what will not run, and why
    STATUS=("${kept[@]}")
    FAILED=$failed
    "$1"
}

# finish: print each step's status and the ratios against their targets, pack $OUT, exit 0 only if
# every step passed
finish() {
    echo
    echo "=== summary ($(($(date +%s) - START)) s in all)"
    printf '%s\n' "${STATUS[@]}" | tee "$LOGS/steps.txt"
    "$PY" benchmarks/suite_summary.py benchmarks/results | tee "$LOGS/summary.txt"
    if [ -n "${OUT:-}" ]; then
        # the device tool returns at most 8 files: this run's JSON in one archive (a full suite writes
        # more than 8), plots and logs in another, the summary as it printed
        find benchmarks/results -name '*.json' -newer "$LOGS/environment.log" -printf '%f\n' >"$LOGS/results.txt"
        tar -czf "$OUT/results.tar.gz" -C benchmarks/results -T "$LOGS/results.txt"
        find benchmarks/results -name '*.png' -newer "$LOGS/environment.log" -exec cp {} "$LOGS/" \;
        cp "$LOGS/summary.txt" "$LOGS/steps.txt" "$OUT/"
        tar -czf "$OUT/logs_and_plots.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
        echo "results in $OUT/results.tar.gz (tar -xzf it in benchmarks/results), logs and plots in $OUT/logs_and_plots.tar.gz"
    else
        echo "logs in $LOGS"
    fi
    exit $FAILED
}
