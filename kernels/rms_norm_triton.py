"""Triton kernel of RMSNorm with an optional fused residual add (see :mod:`.rms_norm_reference`).

One program normalises ``BLOCK_T`` rows of ``BLOCK_D >= D`` columns: a whole row is in registers, so
the residual sum is read once, written once (the new residual stream) and normalised without a second
pass over memory. Accumulation in float32. No ``tl.dot``: no minimum tile sizes. The residual stream
may be float32 under 16-bit branch outputs (``residual_in_fp32``), and the normalised rows are written
in the output's dtype (16-bit for the next GEMMs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import new_output, next_power_of_2

#: ``BLOCK_T * BLOCK_D`` elements per program (one row when a row is longer).
TILE_ELEMENTS = 4096
#: Widest row the kernel holds in registers (Llama-70B: 8192; every supported model is below).
MAX_BLOCK_D = 16384


@triton.jit
def _row_tile(n_rows, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's ``BLOCK_T`` rows (int64) and ``BLOCK_D`` columns, and the mask of the real ones."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    return rows, cols, (rows < n_rows)[:, None] & (cols < D)[None, :]


@triton.jit
def _norm_tile(
    X,
    R,
    W,
    S,
    n_rows,
    D,
    stride_x,
    stride_r,
    stride_s,
    eps,
    offset,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """This program's tile: ``(y, rows, cols, mask)``, ``y`` the normalised rows in float32, to be
    rounded to the output dtype by the caller (the residual sum stored to ``S`` on the way)."""
    rows, cols, mask = _row_tile(n_rows, D, BLOCK_T, BLOCK_D)
    # float32 arithmetic throughout: a sum or product of two 16-bit values is exact there or rounds
    # as the 16-bit operation would, so casting once to the input dtype gives torch's bits
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        # the add in the residual stream's dtype (``S``'s: ``x``'s, or float32 for a float32 stream), as
        # the decoder layer does it; the sum is the new residual stream and the norm's input
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        dtype = S.dtype.element_ty
        xf = (xf + r.to(tl.float32)).to(dtype)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], xf, mask=mask)
        xf = xf.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    if GEMMA:
        y = xf * rstd[:, None] * (offset + w)[None, :]
    else:
        # Llama: normalised in float32, rounded to the input dtype, then times the weight (a float32
        # product: exact for 16-bit operands, torch's promotion for a float32 weight or input)
        y = (xf * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
    return y, rows, cols, mask


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    S,
    n_rows,
    D,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    eps,
    offset,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    y, rows, cols, mask = _norm_tile(
        X, R, W, S, n_rows, D, stride_x, stride_r, stride_s, eps, offset, HAS_RESIDUAL, GEMMA, BLOCK_T, BLOCK_D
    )
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def launch_config(d: int, operands: int = 1) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` for a row kernel over rows of ``d`` columns that holds
    ``operands`` such rows per token in registers (SwiGLU's gate and up: 2): powers of two, 16 fp32
    elements of the tile per thread at most (8 warps up to 4096-element tiles, 16 above; checked
    spill-free by ``compile_check``). Shared by the RMSNorm and FP8 kernels."""
    block_d = max(16, next_power_of_2(d))
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"a row of {d} columns exceeds the row kernels' {MAX_BLOCK_D}-column rows")
    block_t = max(1, min(64, TILE_ELEMENTS // (operands * block_d)))
    return block_t, block_d, 8 if operands * block_t * block_d <= TILE_ELEMENTS else 16


def rms_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    gemma: bool,
    offset: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y in out_dtype, residual + x in residual's dtype or None)`` for ``x`` ``[N, D]`` (last dim
    contiguous)."""
    n_rows, d = x.shape
    y = new_output((n_rows, d), out_dtype, x.device)
    total = new_output((n_rows, d), residual.dtype, x.device) if residual is not None else None
    block_t, block_d, num_warps = launch_config(d)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_t),)](
        x,
        residual if residual is not None else x,
        weight,
        y,
        total if total is not None else y,
        n_rows,
        d,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        total.stride(0) if total is not None else 0,
        float(eps),
        float(offset),
        HAS_RESIDUAL=residual is not None,
        GEMMA=gemma,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, total
