"""Row-wise FP8 quantization: public entry point and custom op.

``fp8_quantize_rows(x)`` returns ``x`` ``[..., D]`` as ``float8_e4m3fn`` with one float32 scale per
row (``amax / 448``): the per-token activation quantization of an FP8 W8A8 GEMM
(:class:`llm2vec_fast.fp8.FP8Linear`), in one pass over the activations. Semantics are defined by
:mod:`.fp8_quant_reference`, the ground truth and CPU path; the kernel gives its bits.

Backend rule as for the other ops: ``"auto"`` runs the Triton kernel (:mod:`.fp8_quant_triton`) on
CUDA tensors and the reference otherwise; ``"triton"`` forces the kernel (CPU only under
``TRITON_INTERPRET=1``); ``"torch"`` forces the reference. Runs as
``torch.ops.llm2vec_fast.fp8_quantize_rows`` with a fake implementation, so ``torch.compile`` traces
it without a graph break. Inference only: no autograd.
"""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .fp8_quant_reference import FP8_DTYPE, fp8_quantize_rows_reference

__all__ = ["fp8_quantize_rows"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("llm2vec_fast::fp8_quantize_rows", mutates_args=())
def _fp8_quantize_rows_op(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, D] float8_e4m3fn, scales [N, 1] float32)`` for 2-D ``x``."""
    if backend == "triton":
        from . import fp8_quant_triton  # lazy: triton is optional

        return fp8_quant_triton.fp8_quantize_rows_forward(x if x.stride(-1) == 1 else x.contiguous())
    return fp8_quantize_rows_reference(x)


@_fp8_quantize_rows_op.register_fake
def _(x, backend):
    return torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device), torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)


def fp8_quantize_rows(x: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise FP8 quantization of ``x`` ``[..., D]``.

    Args:
        x: fp16/bf16/fp32 values (activations, or a weight ``[out, in]``: one scale per output).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).

    Returns:
        ``(q, scales)``: ``q`` ``float8_e4m3fn`` in ``x``'s shape and ``scales`` float32 ``[..., 1]``,
        with ``x ~= q.float() * scales`` (rounded to nearest even, values clamped to +-448).

    Raises:
        ValueError: a dtype other than fp16/bf16/fp32, a 0-d tensor, or an unknown backend.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("x must be a torch.Tensor with at least one dimension")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; expected one of {_FLOAT_DTYPES}")
    resolved = resolve_backend(backend, (x,))
    shape = x.shape
    if resolved == "triton":
        from .rms_norm_triton import MAX_BLOCK_D  # the kernel holds a row in registers

        if shape[-1] > MAX_BLOCK_D:
            if backend == "triton":
                raise ValueError(f"the Triton FP8 quantization holds rows of up to {MAX_BLOCK_D} columns, got {shape[-1]}")
            resolved = "torch"
    q, scales = torch.ops.llm2vec_fast.fp8_quantize_rows(x.detach().reshape(-1, shape[-1]), resolved)
    return q.reshape(shape), scales.reshape(*shape[:-1], 1)
