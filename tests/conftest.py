"""Shared pytest setup."""

import os

import torch

# --- Triton kernels (tests/test_flash_attn.py, tests/test_pooling_kernels.py) -----------------
# Without a GPU the kernel tests run the Triton code on CPU tensors through the Triton interpreter,
# which must be switched on before triton is first imported. The library itself never uses the
# interpreter unless a test asks for backend="triton" (backend="auto" runs torch on CPU), so the
# rest of the suite is unaffected. With CUDA the kernel tests run the compiled kernels instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
