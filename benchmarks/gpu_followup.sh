#!/usr/bin/env bash
# The GPU follow-up: the second call of a session with a GPU, right after gpu_suite.sh (a warm machine
# is handed back after ~30 s idle, and a fresh one costs minutes of the 15). What the suite leaves out
# to stay within its budget (~4 minutes on an H100/H200, install included; the steps run in this order,
# so a short budget cuts the last):
#   1. bench_encode.py --quick --methods packed packed-fused packed-fp8 --shapes llama-1b llama-8b:
#      FP8 W8A8 of the *fused* model (the norms and SwiGLU quantize for the FP8 GEMMs: rms_norm_fp8,
#      silu_mul_fp8) vs plain and fused bf16 packed, over the float32 residual stream FP8 loads with and
#      over the model's bf16 one (what the float32 stream costs) -> fp8-fused-encode-<card>.json
#   2. bench_train.py --quick --fused 1: MNTP and SimCSE steps with fused norms and Liger RoPE vs
#      plain transformers + peft -> train-fused-<card>.json
#   3. bench_fp8_load.py: seconds of an FP8 load on the card (nearest, GPTQ, GPTQ + calibration; 1B
#      shapes) -> fp8-load-<card>.json
# Steps 1-2 need liger-kernel, steps 2-3 the tokenizer: `make gpu-carry` first, then
#   run(command="bash benchmarks/gpu_followup.sh", carry=[".gpu_carry"], timeout_s=320)
# FOLLOWUP_BUDGET_S (default 280 s) caps the whole; every step runs under `timeout`, and the JSON is
# rewritten after each shape / case, so a cut-short run keeps what finished.
# Exit status: 0 when every step passed, else 1 (the summary still prints).
BUDGET=${FOLLOWUP_BUDGET_S:-280}
# environment record, install (+ the carried liger-kernel wheel), step() and finish()
source "$(dirname "$0")/gpu_steps.sh"

followup_steps() {
    if has_liger; then
        step bench-encode-fp8-fused 130 "$PY" benchmarks/bench_encode.py --quick \
            --methods packed packed-fused packed-fp8 packed-fp8-bf16-residual --shapes llama-1b llama-8b --name fp8-fused-encode
        step bench-train-fused 100 "$PY" benchmarks/bench_train.py --quick --fused 1 "${TOKENIZER_ARGS[@]}"
    else
        STATUS+=("bench-encode-fp8-fused, bench-train-fused: skipped ($LIGER_MISSING)")
        FAILED=1
    fi
    # what an FP8 load costs on the card: nearest rounding, GPTQ, GPTQ + layer calibration (1B shapes)
    step bench-fp8-load 90 "$PY" benchmarks/bench_fp8_load.py "${TOKENIZER_ARGS[@]}"
}

plan_and_run followup_steps
finish
