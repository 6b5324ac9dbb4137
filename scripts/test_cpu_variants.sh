#!/usr/bin/env bash
# Runs the test suite under other CPU code paths than this machine's best: the float rounding of
# numpy (the Triton interpreter computes with it), OpenBLAS (numpy's matmul), ATen and oneDNN
# (torch) differs between vector ISAs, and that is where an AVX2 machine and an AVX-512/AMX machine
# disagree. Each variant caps all four libraries at one ISA level.
#   scripts/test_cpu_variants.sh [pytest args...]     (default: the whole suite)
# Used by `make test-cpu-variants`; the python is $PY (default .venv/bin/python).
set -uo pipefail
PY=${PY:-.venv/bin/python}
declare -A VARIANTS=(
  [avx2]="NPY_DISABLE_CPU_FEATURES='X86_V4 AVX512_ICL AVX512_SPR' OPENBLAS_CORETYPE=Haswell ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
  [sse4]="NPY_DISABLE_CPU_FEATURES='X86_V3 X86_V4 AVX512_ICL AVX512_SPR' OPENBLAS_CORETYPE=Nehalem ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"
)
status=0
for name in avx2 sse4; do
  echo "=== CPU variant $name: ${VARIANTS[$name]}"
  eval "env ${VARIANTS[$name]} $PY -c 'import numpy, torch; from numpy._core._multiarray_umath import __cpu_dispatch__ as d; import threadpoolctl as t; print(\"numpy dispatch:\", [f for f in d if numpy._core._multiarray_umath.__cpu_features__[f]], \"| openblas:\", [i.get(\"architecture\") for i in t.threadpool_info()], \"| aten:\", torch.backends.cpu.get_cpu_capability())'"
  eval "env ${VARIANTS[$name]} $PY -m pytest $*" || status=1
done
exit $status
