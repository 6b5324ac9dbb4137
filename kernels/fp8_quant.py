"""Row-wise FP8 quantization: public entry points and custom ops.

``fp8_quantize_rows(x)`` returns ``x`` ``[..., D]`` as ``float8_e4m3fn`` with one float32 scale per
row (``amax / 448``): the per-token activation quantization of an FP8 W8A8 GEMM
(:class:`llm2vec_fast.fp8.FP8Linear`), in one pass over the activations. Semantics are defined by
:mod:`.fp8_quant_reference`, the ground truth and CPU path; the kernel gives its bits.

``rms_norm_fp8(x, weight, eps, residual=...)`` is :func:`~.rms_norm.rms_norm` followed by that
quantization in one kernel: the normalised rows are quantized in registers instead of being written
out and read back (the input norms of a decoder layer whose projections run FP8). Its reference is
the two references one after the other; the kernel matches it as the norm kernel matches its own
(the norm within float32 rounding, so a rare value can land on the neighbouring e4m3 step).
``silu_mul_fp8(gate_up)`` is SwiGLU's ``silu(gate) * up`` followed by the quantization, the input of
an FP8 ``down_proj``, in the same way.

Backend rule as for the other ops: ``"auto"`` runs the Triton kernel (:mod:`.fp8_quant_triton`) on
CUDA tensors and the reference otherwise; ``"triton"`` forces the kernel (CPU only under
``TRITON_INTERPRET=1``); ``"torch"`` forces the reference. Runs as
``torch.ops.llm2vec_fast.fp8_quantize_rows`` with a fake implementation, so ``torch.compile`` traces
it without a graph break. Inference only: no autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dispatch import resolve_backend
from .fp8_quant_reference import FP8_DTYPE, fp8_quantize_rows_reference
from .rms_norm import _FLOAT_DTYPES, check_norm_arguments, normed_dtype, row_kernel_backend
from .rms_norm_reference import add_rms_norm_reference, rms_norm_reference

__all__ = ["FP8Rows", "fp8_quantize_rows", "rms_norm_fp8", "silu_mul_fp8"]


class FP8Rows(NamedTuple):
    """Rows quantized to FP8: ``values`` ``float8_e4m3fn`` ``[..., D]`` and float32 ``scales``
    ``[..., 1]``, ``values * scales ~=`` the rows. ``shape`` is the rows' shape, so a module that only
    reads ``x.shape`` before its projections takes them in place of a tensor."""

    values: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape


def _check_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must be a torch.Tensor with at least one dimension, the last one non-empty")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} dtype {x.dtype} is not supported; expected one of {_FLOAT_DTYPES}")


def _fake_fp8_rows(rows: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((rows, d), dtype=FP8_DTYPE, device=device), torch.empty((rows, 1), dtype=torch.float32, device=device)


def _unflatten(q: torch.Tensor, scales: torch.Tensor, leading: torch.Size) -> FP8Rows:
    """The op's ``[N, D]`` / ``[N, 1]`` outputs back in the input's leading dims."""
    return FP8Rows(q.reshape(*leading, q.shape[-1]), scales.reshape(*leading, 1))


@torch.library.custom_op("llm2vec_fast::fp8_quantize_rows", mutates_args=())
def _fp8_quantize_rows_op(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, D] float8_e4m3fn, scales [N, 1] float32)`` for 2-D ``x``."""
    if backend == "triton":
        from . import fp8_quant_triton  # lazy: triton is optional

        return fp8_quant_triton.fp8_quantize_rows_forward(x if x.stride(-1) == 1 else x.contiguous())
    return fp8_quantize_rows_reference(x)


@_fp8_quantize_rows_op.register_fake
def _(x, backend):
    return _fake_fp8_rows(x.shape[0], x.shape[1], x.device)


def fp8_quantize_rows(x: torch.Tensor, *, backend: str = "auto") -> FP8Rows:
    """Row-wise FP8 quantization of ``x`` ``[..., D]``.

    Args:
        x: fp16/bf16/fp32 values (activations, or a weight ``[out, in]``: one scale per output).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).

    Returns:
        :class:`FP8Rows` ``(q, scales)``: ``q`` ``float8_e4m3fn`` in ``x``'s shape and ``scales``
        float32 ``[..., 1]``, with ``x ~= q.float() * scales`` (rounded to nearest even, values
        clamped to +-448).

    Raises:
        ValueError: a dtype other than fp16/bf16/fp32, a 0-d tensor, or an unknown backend.
    """
    _check_input(x, "x")
    resolved = row_kernel_backend(backend, resolve_backend(backend, (x,)), x.shape[-1], "FP8 quantization")
    q, scales = torch.ops.llm2vec_fast.fp8_quantize_rows(x.detach().reshape(-1, x.shape[-1]), resolved)
    return _unflatten(q, scales, x.shape[:-1])


@torch.library.custom_op("llm2vec_fast::rms_norm_fp8_fwd", mutates_args=())
def _rms_norm_fp8_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    casting: str,
    offset: float,
    out_dtype: torch.dtype | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [N, D], scales [N, 1], residual + x [N, D])`` for 2-D ``x``; the last output is empty
    ``[0]`` without ``residual``."""
    if backend == "triton":
        from . import fp8_quant_triton

        x = x if x.stride(-1) == 1 else x.contiguous()
        residual = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
        normed = normed_dtype(x, residual, weight, casting, out_dtype)
        q, scales, total = fp8_quant_triton.rms_norm_fp8_forward(x, residual, weight.contiguous(), eps, casting == "gemma", offset, normed)
    else:
        if residual is not None:
            y, total = add_rms_norm_reference(x, residual, weight, eps, casting, offset, out_dtype)
        else:
            y, total = rms_norm_reference(x, weight, eps, casting, offset, out_dtype), None
        q, scales = fp8_quantize_rows_reference(y)
    return q, scales, (total if total is not None else x.new_empty((0,)))


@_rms_norm_fp8_op.register_fake
def _(x, residual, weight, eps, casting, offset, out_dtype, backend):
    total = torch.empty_like(residual) if residual is not None else x.new_empty((0,))
    return *_fake_fp8_rows(x.shape[0], x.shape[1], x.device), total


def rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    casting: str = "llama",
    offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> FP8Rows | tuple[FP8Rows, torch.Tensor]:
    """RMSNorm of ``x`` ``[..., D]`` (of ``residual + x`` with ``residual``) quantized to FP8 per row.

    The arguments are :func:`~.rms_norm.rms_norm`'s (``out_dtype``: the dtype the normalised rows
    are rounded to before quantizing, as the unfused norm would write them). Returns
    :class:`FP8Rows` of the normalised rows (as :func:`fp8_quantize_rows` would quantize
    ``rms_norm``'s output), and with ``residual`` also ``residual + x`` in ``residual``'s dtype.
    Inference only (no autograd).

    Raises:
        ValueError: as :func:`~.rms_norm.rms_norm`.
    """
    resolved = check_norm_arguments(x, weight, residual, casting, offset, backend, out_dtype)
    shape = x.shape
    flat_residual = residual.detach().reshape(-1, shape[-1]) if residual is not None else None
    q, scales, total = torch.ops.llm2vec_fast.rms_norm_fp8_fwd(
        x.detach().reshape(-1, shape[-1]), flat_residual, weight.detach(), float(eps), casting, float(offset), out_dtype, resolved
    )
    rows = _unflatten(q, scales, shape[:-1])
    return rows if residual is None else (rows, total.reshape(shape))


@torch.library.custom_op("llm2vec_fast::silu_mul_fp8", mutates_args=())
def _silu_mul_fp8_op(gate_up: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, D], scales [N, 1])`` of ``silu(gate) * up`` for 2-D ``gate_up`` ``[N, 2D]``."""
    if backend == "triton":
        from . import fp8_quant_triton

        return fp8_quant_triton.silu_mul_fp8_forward(gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return fp8_quantize_rows_reference(torch.nn.functional.silu(gate) * up)


@_silu_mul_fp8_op.register_fake
def _(gate_up, backend):
    return _fake_fp8_rows(gate_up.shape[0], gate_up.shape[1] // 2, gate_up.device)


def silu_mul_fp8(gate_up: torch.Tensor, *, backend: str = "auto") -> FP8Rows:
    """SwiGLU's ``silu(gate) * up`` of ``gate_up`` ``[..., 2D]`` (gate first, then up, as a stacked
    gate/up projection writes them), quantized to FP8 per row.

    Args:
        gate_up: fp16/bf16/fp32, last dim even.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).

    Returns:
        :class:`FP8Rows` of the ``[..., D]`` product. Inference only (no autograd).

    Raises:
        ValueError: a dtype other than fp16/bf16/fp32, an odd last dim, an unknown backend, or
            ``backend="triton"`` with halves wider than the kernel's rows (``"auto"`` then takes
            the reference).
    """
    _check_input(gate_up, "gate_up")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim holds gate and up (an even size), got {gate_up.shape[-1]}")
    resolved = row_kernel_backend(backend, resolve_backend(backend, (gate_up,)), gate_up.shape[-1] // 2, "SwiGLU + FP8 quantization")
    q, scales = torch.ops.llm2vec_fast.silu_mul_fp8(gate_up.detach().reshape(-1, gate_up.shape[-1]), resolved)
    return _unflatten(q, scales, gate_up.shape[:-1])
