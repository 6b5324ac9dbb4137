"""Triton kernels for masked pooling over packed rows, forward and fused backward.

Both kernels run one program per (sequence, block of BLOCK_D features) and stream the sequence's
rows in chunks of BLOCK_T, reading the pool mask as bytes. Only pooled rows of ``hidden`` are loaded
(the load is masked by the pool mask), so padding or unpooled prompt tokens cost no bandwidth and
cannot leak NaN/Inf into the result. Accumulation is fp32; the output has the input dtype.

Modes (same numbering in both kernels): 0 ``mean``, 1 ``weighted_mean`` (the j-th pooled token has
weight j; normaliser n(n+1)/2), 2 ``last``, 3 ``first``. The forward also writes one int32 per
sequence for the backward: the pooled-token count (modes 0, 1) or the row index of the selected
token, -1 when there is none (modes 2, 3). The backward writes every row of the sequence:
``grad_hidden[t] = w_t * grad_out[b]`` (zero for unpooled rows).

The padded ``[B, L, D]`` layout is handled by the caller as packed rows with ``cu_seqlens = b * L``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import autotune_cache_kwargs, interpreter_enabled, new_output, next_power_of_2

INTERPRETED = interpreter_enabled()
#: Autotune choices are cached on disk where Triton supports it (warm start of a new process).
AUTOTUNE_CACHE = autotune_cache_kwargs(triton.autotune)

MODE_IDS = {"mean": 0, "weighted_mean": 1, "last": 2, "first": 3}


def _configs():
    if INTERPRETED:  # one small config: several chunks per sequence and feature blocks in the tests
        return [triton.Config({"BLOCK_T": 8, "BLOCK_D": 32}, num_warps=4)]
    # Each program walks its sequence's rows serially, BLOCK_T at a time: the longest sequence's
    # chain of dependent loads sets the time, so no config takes fewer than 32 rows a step (8- and
    # 16-row configs were picked by a launch-bound autotune and made varlen mean 2.7x slower than
    # weighted_mean on an H100); BLOCK_D <= 256 keeps >= 8 programs per sequence at D = 2048.
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
        for bt, bd, w in [(32, 128, 4), (32, 256, 8), (64, 128, 8), (64, 64, 4)]
    ]


_KEY = ["D", "MODE", "batch_bucket", "len_bucket"]
#: Rows of the pool mask ``last``/``first`` scan per step: the bytes of a whole 1024-token sequence
#: in one load instead of a dependent load per BLOCK_T rows.
SCAN_T = tl.constexpr(16 if INTERPRETED else 1024)  # the interpreter tests keep several steps
#: Autotune keys only (unused in the kernels): no compile per value class.
_NOT_SPECIALIZED = ["batch_bucket", "len_bucket"]


@triton.jit
def _pool_coords(CU, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(sequence, feature block)`` -> sequence index, row range, row/feature offsets, feature mask."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, tl.load(CU + b), tl.load(CU + b + 1), tl.arange(0, BLOCK_T), offs_d, offs_d < D


@triton.jit
def _pool_weights(m, rows, running, stat, MODE: tl.constexpr):
    """Unnormalised weight of each row of a chunk and the updated running pooled-token count."""
    mi = m.to(tl.int32)
    if MODE == 0:
        w = mi.to(tl.float32)
    elif MODE == 1:
        w = ((running + tl.cumsum(mi, 0)) * mi).to(tl.float32)
    else:
        w = (rows == stat).to(tl.float32)
    return w, running + tl.sum(mi, 0)


@triton.jit
def _normaliser(count, MODE: tl.constexpr):
    c = count.to(tl.float32)
    if MODE == 1:
        c = c * (c + 1.0) * 0.5
    return tl.maximum(c, 1.0)


@triton.autotune(configs=_configs(), key=_KEY, **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _pool_fwd_kernel(
    H, MASK, CU, OUT, STATS, stride_ht, stride_ob, D, batch_bucket, len_bucket,
    MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, start, end, offs_t, offs_d, d_ok = _pool_coords(CU, D, BLOCK_T, BLOCK_D)
    if MODE <= 1:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        count = tl.zeros([], dtype=tl.int32)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + offs_t
            m = tl.load(MASK + rows, mask=rows < end, other=0) != 0
            h = tl.load(H + rows.to(tl.int64)[:, None] * stride_ht + offs_d[None, :],
                        mask=m[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            w, count = _pool_weights(m, rows, count, 0, MODE)
            acc += tl.sum(h * w[:, None], 0)
        out = acc / _normaliser(count, MODE)
        stat = count
    else:
        if MODE == 2:
            idx = tl.full([], -1, dtype=tl.int32)
        else:
            idx = end  # "none yet"
        for t0 in range(start, end, SCAN_T):  # the mask only: wide steps
            rows = t0 + tl.arange(0, SCAN_T)
            m = tl.load(MASK + rows, mask=rows < end, other=0) != 0
            if MODE == 2:
                idx = tl.maximum(idx, tl.max(tl.where(m, rows, -1), 0))
            else:
                idx = tl.minimum(idx, tl.min(tl.where(m, rows, end), 0))
        found = (idx >= start) & (idx < end)
        load_ok = d_ok & ((offs_d * 0 + found.to(tl.int32)) != 0)  # explicit broadcast of the scalar
        out = tl.load(H + idx.to(tl.int64) * stride_ht + offs_d, mask=load_ok, other=0.0).to(tl.float32)
        stat = tl.where(found, idx, -1)
    tl.store(OUT + b.to(tl.int64) * stride_ob + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    if tl.program_id(1) == 0:
        tl.store(STATS + b, stat)


@triton.autotune(configs=_configs(), key=_KEY, **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _pool_bwd_kernel(
    GOUT, MASK, CU, STATS, GH, stride_gb, stride_ght, D, batch_bucket, len_bucket,
    MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, start, end, offs_t, offs_d, d_ok = _pool_coords(CU, D, BLOCK_T, BLOCK_D)
    stat = tl.load(STATS + b)
    g = tl.load(GOUT + b.to(tl.int64) * stride_gb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if MODE <= 1:
        g = g / _normaliser(stat, MODE)
    running = tl.zeros([], dtype=tl.int32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + offs_t
        row_ok = rows < end
        m = tl.load(MASK + rows, mask=row_ok, other=0) != 0
        w, running = _pool_weights(m, rows, running, stat, MODE)
        gh = w[:, None] * g[None, :]
        tl.store(GH + rows.to(tl.int64)[:, None] * stride_ght + offs_d[None, :], gh.to(GH.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton pooling kernels were built without the interpreter; CPU tensors need "
            "TRITON_INTERPRET=1 set before triton is imported"
        )


def _launch(kernel, n_seq: int, d: int, max_len: int, mode: str, *args) -> None:
    def grid(cfg):
        return (n_seq, triton.cdiv(d, cfg["BLOCK_D"]))

    kernel[grid](*args, d, min(next_power_of_2(n_seq), 1024), min(next_power_of_2(max_len), 8192), MODE=MODE_IDS[mode])


def pool_forward(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mask_u8: torch.Tensor, mode: str, max_len: int):
    """``hidden`` ``[T, D]`` (unit feature stride), ``mask_u8`` ``[T]`` uint8 -> ``(out [B, D], stats int32 [B])``."""
    _check_device(hidden)
    n_seq, d = cu_seqlens.numel() - 1, hidden.shape[1]
    out = new_output((n_seq, d), hidden.dtype, hidden.device)
    stats = new_output((n_seq,), torch.int32, hidden.device)
    if d > 0 and n_seq > 0:
        _launch(_pool_fwd_kernel, n_seq, d, max_len, mode, hidden, mask_u8, cu_seqlens, out, stats,
                hidden.stride(0), out.stride(0))
    return out, stats


def pool_backward(grad_out: torch.Tensor, cu_seqlens: torch.Tensor, mask_u8: torch.Tensor, stats: torch.Tensor,
                  mode: str, n_tokens: int, dtype: torch.dtype, max_len: int) -> torch.Tensor:
    """Gradient ``[T, D]`` of :func:`pool_forward` for ``grad_out`` ``[B, D]``; every row is written."""
    _check_device(grad_out)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    n_seq, d = grad_out.shape
    grad_hidden = new_output((n_tokens, d), dtype, grad_out.device)
    if d > 0 and n_tokens > 0:
        _launch(_pool_bwd_kernel, n_seq, d, max_len, mode, grad_out, mask_u8, cu_seqlens, stats, grad_hidden,
                grad_out.stride(0), grad_hidden.stride(0))
    return grad_hidden
