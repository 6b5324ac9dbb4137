#!/usr/bin/env bash
# GPU suite for ONE call of the device tool (~6 minutes on an H100/H200 before the FP8 step, install included):
#   1. pip install --no-deps --no-build-isolation -e .   (the image has torch/triton/transformers)
#   2. benchmarks/bench_encode.py --quick (with the card's bf16/FP8 GEMM ceilings and model FLOPs
#      utilisation), bench_encode.py --quick --methods packed packed-fp8 (FP8 W8A8 vs bf16 packed
#      tokens/s, 1B and 8B random shapes; sm_89+, else recorded as not run), bench_attention.py --quick, bench_pooling.py --quick,
#      bench_first_embedding.py (fresh-process compile + autotune stall, cold vs warm Triton cache),
#      bench_train.py --quick (MNTP and SimCSE steps, 1B shapes, packed vs HF, tokens/s and peak memory),
#      bench_encode.py --quick --methods packed packed-fused packed-fused-graphs (fused decoder layers and
#      their CUDA graphs vs plain bf16 packed, SmolLM2-135M / 1B / 8B random shapes; needs liger-kernel),
#      bench_onnx_cuda.py --quick (ONNX Runtime's CUDA provider on the fp16 export vs torch; where the
#      image's onnxruntime has no CUDA provider, the reason is recorded instead),
#      bench_serve.py --device cuda (32 clients, packed path, vs direct embed_items; if the serve extra is there)
#   3. pytest of the kernel tests (pooling, attention, fused layers, CUDA graphs, FP8 kernels and the FP8
#      layer against the simulation, the custom ops under torch.compile; compiled kernels; last). The
#      tests pin each autotuned kernel to one config per head-dim class (tests/conftest.py), so a case
#      compiles each kernel once; KERNEL_TESTS (a pytest -k expression) picks the cases: by default
#      what only a GPU checks (bf16, large fp16, compiled dropout, pooling; ~12 kernel variants);
#      KERNEL_TESTS=all runs every case (~30 variants more, with the fuzzers: run it alone).
#   4. prints each ratio against its target; with $OUT set, this run's JSON go to $OUT/results.tar.gz,
#      logs and plots to $OUT/logs_and_plots.tar.gz, plus steps.txt and summary.txt (the tool returns at
#      most 8 files; unpack the JSON with tar -xzf results.tar.gz -C benchmarks/results).
#
# With the device tool (files written under $OUT come back):
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".gpu_carry"], timeout_s=540)
# Random weights, no downloads. Every step runs under `timeout`, so a hang costs only that step's
# cap; the whole suite stops starting steps once SUITE_BUDGET_S (default 480 s) is spent. A step with a
# minimum (the FP8 step: FP8_MIN_S, default 60 s) is skipped rather than started with less time left.
# SUITE_FULL=1 drops --quick (longer: run it alone, not in the 6-minute call).
# It prints its plan first (each step, its cap and command, the budget), then runs it.
# Exit status: 0 when every step passed, else 1 (the summary still prints).
BUDGET=${SUITE_BUDGET_S:-480}
FP8_MIN_S=${FP8_MIN_S:-60}
FUSED_MIN_S=${FUSED_MIN_S:-60}
QUICK=--quick
[ "${SUITE_FULL:-0}" = 1 ] && QUICK=
# KERNEL_TESTS: a pytest -k expression that limits the kernel tests; "all" = every case
KERNEL_TESTS_DEFAULT="gpu or dropout or padded or varlen or unwritten"
KERNEL_TESTS=${KERNEL_TESTS:-$KERNEL_TESTS_DEFAULT}
[ "$KERNEL_TESTS" = all ] && KERNEL_TESTS=
# environment record, install (+ the carried liger-kernel wheel), step() and finish()
source "$(dirname "$0")/gpu_steps.sh"

suite_steps() {
    # the headline (encode vs the official-style reference) first, so a slow step cannot starve it
    step bench-encode 150 "$PY" benchmarks/bench_encode.py $QUICK
    # FP8 W8A8 (torch._scaled_mm, row-wise scales) vs bf16, packed path only (the reference is above):
    # JSON fp8-encode-<card>.json (not encode-*: the docs tables read those) is rewritten after each shape, so a cut-short 8B keeps the 1B result
    MIN_LEFT_S=$FP8_MIN_S step bench-encode-fp8 90 "$PY" benchmarks/bench_encode.py $QUICK --methods packed packed-fp8 --name fp8-encode
    # fused decoder layers (fused=True: residual-add + RMSNorm kernel, Liger-Kernel RoPE and SwiGLU, stacked QKV
    # and gate/up GEMMs) and the same from CUDA graphs per token bucket, vs plain bf16 packed; SmolLM2-135M
    # shapes (launch-bound) first. Needs liger-kernel (carried).
    if has_liger; then
        MIN_LEFT_S=$FUSED_MIN_S step bench-encode-fused 100 "$PY" benchmarks/bench_encode.py $QUICK \
            --methods packed packed-fused packed-fused-graphs --shapes smollm2-135m llama-1b llama-8b --name fused-encode
    else
        STATUS+=("bench-encode-fused: skipped ($LIGER_MISSING)")
        FAILED=1
    fi
    step bench-attention 90 "$PY" benchmarks/bench_attention.py $QUICK
    step bench-pooling 70 "$PY" benchmarks/bench_pooling.py $QUICK
    step first-embedding 60 "$PY" benchmarks/bench_first_embedding.py $QUICK
    # all four cases in one process (one CUDA start-up), 1 warm-up + 2 timed steps each; the JSON is
    # rewritten after every case, so a cut-short run still returns the finished ones
    step bench-train 100 "$PY" benchmarks/bench_train.py $QUICK "${TOKENIZER_ARGS[@]}"
    # ONNX Runtime's CUDA provider on the fp16 export vs torch packed (SmolLM2-135M shapes); where the image's
    # onnxruntime has no CUDA provider (the plain wheel; onnxruntime-gpu is too big to carry) it writes why
    step onnx-cuda 90 "$PY" benchmarks/bench_onnx_cuda.py $QUICK "${TOKENIZER_ARGS[@]}"
    # one serve run: 32 clients against our server (packed path, random Llama-1B shapes, the carried
    # tokenizer) vs direct embed_items of the same texts; needs the serve extra (fastapi, uvicorn,
    # orjson, aiohttp) on the image: skipped with a note when missing, never installed here
    if "$PY" -c "import fastapi, uvicorn, orjson, aiohttp" 2>/dev/null; then
        step bench-serve 120 "$PY" benchmarks/bench_serve.py --device cuda --concurrency 32 --requests 256 "${TOKENIZER_ARGS[@]}"
    else
        STATUS+=("bench-serve: skipped (no fastapi/uvicorn/orjson/aiohttp on this image: pip install -e .[serve])")
    fi
    # last: each new (dtype, head dim, variant) compiles its kernels (one config each, see above)
    step kernel-tests 130 "$PY" -m pytest tests/test_pooling_kernels.py tests/test_flash_attn.py tests/test_fused_layers.py \
        tests/test_cuda_graphs.py tests/test_fp8_quant_kernel.py tests/test_fp8.py \
        tests/test_compile_ready_ops.py::test_gpu_compiled_packed_forward_matches_eager -q -p no:cacheprovider \
        --maxfail=5 -rfE --durations=15 ${KERNEL_TESTS:+-k "$KERNEL_TESTS"}
}

plan_and_run suite_steps
finish
