"""Triton kernels of row-wise FP8 quantization (see :mod:`.fp8_quant_reference`): on its own, after
an RMSNorm / residual-add + RMSNorm (the norm of :mod:`.rms_norm_triton`), and after SwiGLU's
``silu(gate) * up``; in the fused ones the result is quantized in registers instead of being written
and read back.

One program quantizes ``BLOCK_T`` rows of ``BLOCK_D >= D`` columns (the RMSNorm kernel's tiling: a
whole row in registers), so the activations are read once and written once as e4m3 -- torch's
version makes a float32 copy, an ``abs``, a reduction, a divide, a clamp and a cast, each a pass over
memory. Divisions are IEEE (``div_rn``) and the cast rounds to nearest even, so the bits are torch's.

The Triton interpreter casts float32 to e4m3 wrongly next to powers of two (the mantissa carry is
lost: 31.9 becomes 16), so under ``TRITON_INTERPRET`` the kernel stores the clamped float32 values
and torch casts them (``CAST=False``); on a GPU the cast is in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import interpreter_enabled, new_output
from .fp8_quant_reference import FP8_DTYPE, FP8_MAX, MIN_SCALE
from .rms_norm_triton import _norm_tile, _row_tile, launch_config


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_tile(x, rows, cols, mask, OUT_Q, OUT_SCALE, stride_q, n_rows, fp8_max, min_scale, CAST: tl.constexpr):
    """Quantize the float32 tile ``x`` (masked entries 0) row by row and store it. NaN and inf go
    through as in torch (a NaN row gets a NaN scale, an inf row an inf scale and NaN where the inf
    was): Triton's default max and clamp drop NaN, which would hide an overflow behind finite values."""
    amax = tl.reduce(tl.abs(x), 1, _max_keeping_nan)
    scale = _max_keeping_nan(tl.math.div_rn(amax, fp8_max), min_scale)
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL)
    if CAST:
        q = q.to(OUT_Q.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(OUT_Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
    tl.store(OUT_SCALE + rows, scale, mask=rows < n_rows)


@triton.jit
def _fp8_quantize_rows_kernel(
    X,
    OUT_Q,
    OUT_SCALE,
    n_rows,
    D,
    stride_x,
    stride_q,
    fp8_max,
    min_scale,
    CAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, mask = _row_tile(n_rows, D, BLOCK_T, BLOCK_D)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _quantize_tile(x, rows, cols, mask, OUT_Q, OUT_SCALE, stride_q, n_rows, fp8_max, min_scale, CAST)


@triton.jit
def _round_to(y, DTYPE: tl.constexpr):
    """``y`` (float32) rounded to ``DTYPE`` (``"bf16"``, ``"fp16"`` or ``"fp32"``) and back."""
    if DTYPE == "bf16":
        y = y.to(tl.bfloat16).to(tl.float32)
    elif DTYPE == "fp16":
        y = y.to(tl.float16).to(tl.float32)
    return y


@triton.jit
def _rms_norm_fp8_kernel(
    X,
    R,
    W,
    S,
    OUT_Q,
    OUT_SCALE,
    n_rows,
    D,
    stride_x,
    stride_r,
    stride_s,
    stride_q,
    eps,
    offset,
    fp8_max,
    min_scale,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    NORMED: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # the norm's output rounded to its dtype (what the unfused norm writes), then quantized
    y, rows, cols, mask = _norm_tile(
        X, R, W, S, n_rows, D, stride_x, stride_r, stride_s, eps, offset, HAS_RESIDUAL, GEMMA, BLOCK_T, BLOCK_D
    )
    _quantize_tile(_round_to(y, NORMED), rows, cols, mask, OUT_Q, OUT_SCALE, stride_q, n_rows, fp8_max, min_scale, CAST)


@triton.jit
def _silu_mul_fp8_kernel(
    GU,
    OUT_Q,
    OUT_SCALE,
    n_rows,
    D,
    stride_gu,
    stride_q,
    fp8_max,
    min_scale,
    CAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, mask = _row_tile(n_rows, D, BLOCK_T, BLOCK_D)
    gate = tl.load(GU + rows[:, None] * stride_gu + cols[None, :], mask=mask, other=0.0)
    up = tl.load(GU + rows[:, None] * stride_gu + D + cols[None, :], mask=mask, other=0.0)
    # SiLU in float32 rounded to the input dtype, then the product in that dtype (as the models and
    # Liger's SwiGLU compute it), then quantized
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(up.dtype)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
    _quantize_tile(out.to(tl.float32), rows, cols, mask, OUT_Q, OUT_SCALE, stride_q, n_rows, fp8_max, min_scale, CAST)


def _fp8_outputs(n_rows: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(q [N, D], scales [N, 1], cast)``: ``q`` is e4m3 when the kernel casts (``CAST``), float32
    under the interpreter, whose e4m3 cast is wrong (see the module docstring)."""
    cast = not interpreter_enabled()
    q = new_output((n_rows, d), FP8_DTYPE if cast else torch.float32, device)
    return q, new_output((n_rows, 1), torch.float32, device), cast


def _as_fp8(q: torch.Tensor, cast: bool) -> torch.Tensor:
    return q if cast else q.to(FP8_DTYPE)


def _launch_row_quantizer(kernel, src: torch.Tensor, d: int, operands: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``kernel`` (the plain or the SwiGLU quantizer: same arguments) over ``src``'s rows of ``d``
    output columns, ``operands`` input rows per token."""
    n_rows = src.shape[0]
    q, scales, cast = _fp8_outputs(n_rows, d, src.device)
    if n_rows:
        block_t, block_d, num_warps = launch_config(d, operands)
        kernel[(triton.cdiv(n_rows, block_t),)](
            src,
            q,
            scales,
            n_rows,
            d,
            src.stride(0),
            q.stride(0),
            FP8_MAX,
            MIN_SCALE,
            CAST=cast,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return _as_fp8(q, cast), scales


def silu_mul_fp8_forward(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn [N, D], scales float32 [N, 1])`` of ``silu(gate) * up`` for ``gate_up``
    ``[N, 2D]`` (gate then up; last dim contiguous)."""
    return _launch_row_quantizer(_silu_mul_fp8_kernel, gate_up, gate_up.shape[1] // 2, operands=2)  # gate and up


def fp8_quantize_rows_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn [N, D], scales float32 [N, 1])`` for ``x`` ``[N, D]`` (last dim contiguous)."""
    return _launch_row_quantizer(_fp8_quantize_rows_kernel, x, x.shape[1])


#: ``_rms_norm_fp8_kernel``'s ``NORMED``: the dtype the normalised rows are rounded to before quantizing
NORMED_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def rms_norm_fp8_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    gemma: bool,
    offset: float,
    normed_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q float8_e4m3fn [N, D], scales float32 [N, 1], residual + x or None)``: the RMSNorm of
    ``x`` (``residual + x``, in ``residual``'s dtype) ``[N, D]`` (last dim contiguous), rounded to
    ``normed_dtype``, quantized per row."""
    n_rows, d = x.shape
    q, scales, cast = _fp8_outputs(n_rows, d, x.device)
    total = new_output((n_rows, d), residual.dtype, x.device) if residual is not None else None
    if n_rows:
        block_t, block_d, num_warps = launch_config(d)
        _rms_norm_fp8_kernel[(triton.cdiv(n_rows, block_t),)](
            x,
            residual if residual is not None else x,
            weight,
            total if total is not None else x,
            q,
            scales,
            n_rows,
            d,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            total.stride(0) if total is not None else 0,
            q.stride(0),
            float(eps),
            float(offset),
            FP8_MAX,
            MIN_SCALE,
            HAS_RESIDUAL=residual is not None,
            GEMMA=gemma,
            NORMED=NORMED_DTYPES[normed_dtype],
            CAST=cast,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return _as_fp8(q, cast), scales, total
