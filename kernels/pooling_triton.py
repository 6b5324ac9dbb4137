"""Triton kernels for masked pooling over packed rows, forward and fused backward.

Only pooled rows of ``hidden`` are loaded (every load is masked by the pool mask, read as bytes), so
padding or unpooled prompt tokens cost no bandwidth and cannot leak NaN/Inf into the result.
Accumulation is fp32; the output has the input dtype.

Modes (same numbering in every kernel): 0 ``mean``, 1 ``weighted_mean`` (the j-th pooled token has
weight j; normaliser n(n+1)/2), 2 ``last``, 3 ``first``.

``mean`` / ``weighted_mean`` forward, two passes (no atomics, so the result is bit-identical from call
to call):

* ``_pool_chunk_kernel``, grid ``(sequence, chunk of CHUNK_T rows, BLOCK_D features)``: each program
  sums its chunk's rows (in BLOCK_T-row steps) into fp32 partials in a workspace: ``S0 = sum(h)`` and,
  for ``weighted_mean``, ``S1 = sum(local rank * h)`` (rank counted from 1 within the chunk), plus the
  chunk's pooled-token count. Programs past their sequence's end do nothing. The time is that of one
  chunk, not of the longest sequence, and every SM gets work. Chunk ``c`` of sequence ``b`` owns
  workspace slot ``cu_seqlens[b] // CHUNK_T + b + c``: fewer than ``T // CHUNK_T + B`` slots, however
  skewed the lengths.
* ``_pool_combine_kernel``, grid ``(sequence, BLOCK_D features)``: adds the chunks in order,
  ``total = sum_c S1_c + before_c * S0_c`` (``before_c``: pooled tokens in earlier chunks, the
  exclusive prefix of the counts), and normalises.

When every sequence fits one chunk (``max_len <= CHUNK_T``) the chunk kernel writes the result
itself (``SINGLE``) and the combine pass is skipped. ``max_len`` only sizes the grid: the last chunk
program of a sequence takes every row left, so a ``max_len`` below the true longest sequence is still
correct, only slower.

``last`` / ``first`` forward (``_pool_select_kernel``, grid ``(sequence, BLOCK_D features)``): a scan
of the sequence's mask in SCAN_T-byte steps, then one row load.

The forward also writes one int32 per sequence for the backward: the pooled-token count (modes 0, 1)
or the row index of the selected token, -1 when there is none (modes 2, 3). The backward
(``_pool_bwd_kernel``, the chunked grid of the forward) writes every row of the sequence:
``grad_hidden[t] = w_t * grad_out[b]`` (zero for unpooled rows); for ``weighted_mean`` a chunk's
program counts the pooled tokens before its chunk from the mask (PREFIX_T bytes a step).

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

#: Rows per chunk program (mean / weighted_mean forward, backward). Fixed on the host, not autotuned:
#: the workspace and the combine pass depend on it. 64 rows keep the fp32 workspace at 4 / (64 * 2) =
#: 3% of the bf16 bytes read (6% for weighted_mean's two partials) while giving a 512-row sequence
#: 8 programs per feature block. The interpreter tests use the same value (chunk boundaries at 64).
CHUNK_T = 64
#: Chunks the combine pass adds per step (its loop runs cdiv(chunks, COMBINE_C) times).
COMBINE_C = 4 if INTERPRETED else 16
#: Features per combine program.
COMBINE_D = 32 if INTERPRETED else 128
COMBINE_WARPS = 4


def _configs():
    """``(BLOCK_T, BLOCK_D, num_warps)`` of the chunk and backward kernels: BLOCK_T divides CHUNK_T."""
    if INTERPRETED:  # one small config: several steps per chunk and feature blocks in the tests
        return [triton.Config({"BLOCK_T": 16, "BLOCK_D": 32}, num_warps=4)]
    # The work is spread over (sequence x chunk x feature block) programs, so the tile only sets the
    # bytes in flight per program (8-16 KB of bf16) and the registers (<= 32 fp32 per thread).
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w) for bt, bd, w in [(32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8)]
    ]


def _select_configs():
    """``BLOCK_D`` of the ``last``/``first`` kernel (one row per program: only the width matters)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_D": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd, w in [(128, 4), (256, 4)]]


_KEY = ["D", "MODE", "batch_bucket", "len_bucket"]
#: Rows of the pool mask ``last``/``first`` scan per step: the bytes of a whole 1024-token sequence in
#: one load instead of a dependent load per BLOCK_T rows.
SCAN_T = tl.constexpr(16 if INTERPRETED else 1024)  # the interpreter tests keep several steps
#: Rows of the pool mask the weighted_mean backward counts per step before its chunk (same reason;
#: the interpreter tests still take several steps past the second chunk).
PREFIX_T = tl.constexpr(CHUNK_T if INTERPRETED else 1024)
#: Autotune keys only (unused in the kernels) and the chunk programs per sequence: no compile per
#: value class ("== 1", "divisible by 16").
_NOT_SPECIALIZED = ["batch_bucket", "len_bucket", "n_chunks_max"]


@triton.jit
def _chunk_rows(CU, n_chunks_max, CHUNK_T: tl.constexpr):
    """Grid ``(sequence, chunk, ...)`` -> sequence index, chunk index, the chunk's first row and its
    end (the sequence's end for the last chunk program, so rows past ``n_chunks_max * CHUNK_T`` are
    not lost), the sequence's first row and end."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    start = tl.load(CU + b)
    end = tl.load(CU + b + 1)
    lo = start + c * CHUNK_T
    hi = tl.where(c == n_chunks_max - 1, end, tl.minimum(end, lo + CHUNK_T))
    return b, c, lo, hi, start, end


@triton.jit
def _first_slot(b, start, CHUNK_T: tl.constexpr):
    """Workspace slot of sequence ``b``'s first chunk, ``start // CHUNK_T + b``: its chunks take the
    slots after it, distinct from every other sequence's, and all slots stay below
    ``T // CHUNK_T + B`` -- the workspace grows with the tokens, not with ``B x max_seqlen``."""
    return (start // CHUNK_T + b).to(tl.int64)


@triton.jit
def _pool_weights(m, rows, running, stat, MODE: tl.constexpr):
    """Unnormalised weight of each row of a step and the updated running pooled-token count."""
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


@triton.jit
def _chunk_sums(H, MASK, lo, hi, stride_ht, offs_d, d_ok, MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 ``S0 = sum(h)``, ``S1 = sum(local rank * h)`` (weighted_mean only) and the pooled-token
    count over rows ``lo:hi``."""
    offs_t = tl.arange(0, BLOCK_T)
    s0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([], dtype=tl.int32)
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + offs_t
        m = tl.load(MASK + rows, mask=rows < hi, other=0) != 0
        h = tl.load(H + rows.to(tl.int64)[:, None] * stride_ht + offs_d[None, :], mask=m[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s0 += tl.sum(h, 0)
        if MODE == 1:
            w, count = _pool_weights(m, rows, count, 0, MODE)
            s1 += tl.sum(h * w[:, None], 0)
        else:
            count += tl.sum(m.to(tl.int32), 0)
    return s0, s1, count


@triton.autotune(configs=_configs(), key=_KEY + ["SINGLE"], **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _pool_chunk_kernel(
    H,
    MASK,
    CU,
    WS,
    COUNTS,
    OUT,
    STATS,
    stride_ht,
    stride_ob,
    D,
    n_chunks_max,
    batch_bucket,
    len_bucket,
    MODE: tl.constexpr,
    SINGLE: tl.constexpr,
    CHUNK_T: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial sums of one chunk in its workspace slot (``WS`` ``[slot, 1 + MODE, D]`` fp32: S0, and
    S1 for weighted_mean; ``COUNTS`` ``[slot]``); with ``SINGLE`` (one chunk per sequence) the
    normalised result in ``OUT`` and the count in ``STATS`` instead."""
    b, c, lo, hi, start, end = _chunk_rows(CU, n_chunks_max, CHUNK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if SINGLE:  # every sequence is one chunk; an empty one writes its zeros
        s0, s1, count = _chunk_sums(H, MASK, lo, hi, stride_ht, offs_d, d_ok, MODE, BLOCK_T, BLOCK_D)
        total = s1 if MODE == 1 else s0
        tl.store(OUT + b.to(tl.int64) * stride_ob + offs_d, (total / _normaliser(count, MODE)).to(OUT.dtype.element_ty), mask=d_ok)
        if tl.program_id(2) == 0:
            tl.store(STATS + b, count)
    elif lo < end:  # chunks past the sequence's end write nothing (the combine pass reads only the others)
        s0, s1, count = _chunk_sums(H, MASK, lo, hi, stride_ht, offs_d, d_ok, MODE, BLOCK_T, BLOCK_D)
        slot = _first_slot(b, start, CHUNK_T) + c
        row = slot * (MODE + 1) * D
        tl.store(WS + row + offs_d, s0, mask=d_ok)
        if MODE == 1:
            tl.store(WS + row + D + offs_d, s1, mask=d_ok)
        if tl.program_id(2) == 0:
            tl.store(COUNTS + slot, count)


@triton.jit(do_not_specialize=["n_chunks_max"])
def _pool_combine_kernel(
    WS,
    COUNTS,
    CU,
    OUT,
    STATS,
    stride_ob,
    D,
    n_chunks_max,
    MODE: tl.constexpr,
    CHUNK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Add a sequence's chunk partials in order (deterministic) and normalise; write the count."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = tl.load(CU + b)
    n_chunks = tl.minimum(tl.cdiv(tl.load(CU + b + 1) - start, CHUNK_T), n_chunks_max)  # the programs that wrote
    first = _first_slot(b, start, CHUNK_T)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    before = tl.zeros([], dtype=tl.int32)  # pooled tokens in the chunks added so far
    for c0 in range(0, n_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < n_chunks
        slot = first + cs
        counts = tl.load(COUNTS + slot, mask=c_ok, other=0)
        ws = (slot * (MODE + 1) * D)[:, None] + offs_d[None, :]
        s0 = tl.load(WS + ws, mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        if MODE == 1:
            s1 = tl.load(WS + ws + D, mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            prior = (before + tl.cumsum(counts, 0) - counts).to(tl.float32)  # exclusive prefix
            acc += tl.sum(s1 + prior[:, None] * s0, 0)
        else:
            acc += tl.sum(s0, 0)
        before += tl.sum(counts, 0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + offs_d, (acc / _normaliser(before, MODE)).to(OUT.dtype.element_ty), mask=d_ok)
    if tl.program_id(1) == 0:
        tl.store(STATS + b, before)


@triton.autotune(configs=_select_configs(), key=_KEY, **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _pool_select_kernel(
    H,
    MASK,
    CU,
    OUT,
    STATS,
    stride_ht,
    stride_ob,
    D,
    batch_bucket,
    len_bucket,
    MODE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``last`` (MODE 2) / ``first`` (MODE 3): the selected row (zeros when none) and its index (-1)."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = tl.load(CU + b)
    end = tl.load(CU + b + 1)
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
    out = tl.load(H + idx.to(tl.int64) * stride_ht + offs_d, mask=load_ok, other=0.0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    if tl.program_id(1) == 0:
        tl.store(STATS + b, tl.where(found, idx, -1))


@triton.autotune(configs=_configs(), key=_KEY, **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _pool_bwd_kernel(
    GOUT,
    MASK,
    CU,
    STATS,
    GH,
    stride_gb,
    stride_ght,
    D,
    n_chunks_max,
    batch_bucket,
    len_bucket,
    MODE: tl.constexpr,
    CHUNK_T: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``GH[t] = w_t * GOUT[b]`` for every row of one chunk (the forward's chunked grid)."""
    b, c, lo, hi, start, end = _chunk_rows(CU, n_chunks_max, CHUNK_T)
    if lo < end:
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        stat = tl.load(STATS + b)
        g = tl.load(GOUT + b.to(tl.int64) * stride_gb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        if MODE <= 1:
            g = g / _normaliser(stat, MODE)
        running = tl.zeros([], dtype=tl.int32)  # weighted_mean: pooled tokens before this row
        if MODE == 1:
            for s in range(start, lo, PREFIX_T):
                rows = s + tl.arange(0, PREFIX_T)
                running += tl.sum((tl.load(MASK + rows, mask=rows < lo, other=0) != 0).to(tl.int32), 0)
        offs_t = tl.arange(0, BLOCK_T)
        for t0 in range(lo, hi, BLOCK_T):
            rows = t0 + offs_t
            row_ok = rows < hi
            m = tl.load(MASK + rows, mask=row_ok, other=0) != 0
            w, running = _pool_weights(m, rows, running, stat, MODE)
            gh = w[:, None] * g[None, :]
            tl.store(
                GH + rows.to(tl.int64)[:, None] * stride_ght + offs_d[None, :],
                gh.to(GH.dtype.element_ty),
                mask=row_ok[:, None] & d_ok[None, :],
            )


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton pooling kernels were built without the interpreter; CPU tensors need "
            "TRITON_INTERPRET=1 set before triton is imported"
        )


def chunks_per_sequence(max_len: int) -> int:
    """Chunk programs per sequence (grid axis 1) for sequences of at most ``max_len`` rows: at least 1,
    at most CUDA's 65535 on that axis (a sequence's last chunk program takes the rows beyond)."""
    return min(max(1, triton.cdiv(int(max_len), CHUNK_T)), 65535)


def workspace_slots(n_tokens: int, n_seq: int) -> int:
    """Workspace slots the two-pass forward needs for ``n_tokens`` packed rows in ``n_seq`` sequences
    (every chunk's slot is below ``n_tokens // CHUNK_T + n_seq``, see ``_first_slot``)."""
    return int(n_tokens) // CHUNK_T + int(n_seq)


def _buckets(n_seq: int, max_len: int) -> tuple[int, int]:
    """Autotune keys: the launch shape class (power-of-two buckets, capped)."""
    return min(next_power_of_2(n_seq), 1024), min(next_power_of_2(max_len), 8192)


def pool_forward(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mask_u8: torch.Tensor, mode: str, max_len: int):
    """``hidden`` ``[T, D]`` (unit feature stride), ``mask_u8`` ``[T]`` uint8 -> ``(out [B, D], stats int32 [B])``.

    ``max_len`` sizes the chunked grid (see the module docstring); no value is read on the host."""
    _check_device(hidden)
    n_seq, d = cu_seqlens.numel() - 1, hidden.shape[1]
    out = new_output((n_seq, d), hidden.dtype, hidden.device)
    stats = new_output((n_seq,), torch.int32, hidden.device)
    if d == 0 or n_seq == 0:
        return out, stats
    mode_id = MODE_IDS[mode]
    buckets = _buckets(n_seq, max_len)
    if mode_id >= 2:
        _pool_select_kernel[lambda cfg: (n_seq, triton.cdiv(d, cfg["BLOCK_D"]))](
            hidden, mask_u8, cu_seqlens, out, stats, hidden.stride(0), out.stride(0), d, *buckets, MODE=mode_id
        )
        return out, stats
    n_chunks = chunks_per_sequence(max_len)
    single = n_chunks == 1
    if single:  # the chunk kernel writes out/stats itself (WS/COUNTS unused)
        ws, counts = torch.empty(1, dtype=torch.float32, device=hidden.device), stats
    else:  # one slot per chunk: see _first_slot
        n_ws = workspace_slots(hidden.shape[0], n_seq)
        ws = new_output((n_ws, 1 + mode_id, d), torch.float32, hidden.device)
        counts = new_output((n_ws,), torch.int32, hidden.device)
    _pool_chunk_kernel[lambda cfg: (n_seq, n_chunks, triton.cdiv(d, cfg["BLOCK_D"]))](
        hidden,
        mask_u8,
        cu_seqlens,
        ws,
        counts,
        out,
        stats,
        hidden.stride(0),
        out.stride(0),
        d,
        n_chunks,
        *buckets,
        MODE=mode_id,
        SINGLE=single,
        CHUNK_T=CHUNK_T,
    )
    if not single:
        _pool_combine_kernel[(n_seq, triton.cdiv(d, COMBINE_D))](
            ws,
            counts,
            cu_seqlens,
            out,
            stats,
            out.stride(0),
            d,
            n_chunks,
            MODE=mode_id,
            CHUNK_T=CHUNK_T,
            BLOCK_C=COMBINE_C,
            BLOCK_D=COMBINE_D,
            num_warps=COMBINE_WARPS,
        )
    return out, stats


def pool_backward(
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask_u8: torch.Tensor,
    stats: torch.Tensor,
    mode: str,
    n_tokens: int,
    dtype: torch.dtype,
    max_len: int,
) -> torch.Tensor:
    """Gradient ``[T, D]`` of :func:`pool_forward` for ``grad_out`` ``[B, D]``; every row of every
    sequence is written (rows past ``cu_seqlens[-1]`` are not)."""
    _check_device(grad_out)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    n_seq, d = grad_out.shape
    grad_hidden = new_output((n_tokens, d), dtype, grad_out.device)
    if d > 0 and n_tokens > 0 and n_seq > 0:
        n_chunks = chunks_per_sequence(max_len)
        _pool_bwd_kernel[lambda cfg: (n_seq, n_chunks, triton.cdiv(d, cfg["BLOCK_D"]))](
            grad_out,
            mask_u8,
            cu_seqlens,
            stats,
            grad_hidden,
            grad_out.stride(0),
            grad_hidden.stride(0),
            d,
            n_chunks,
            *_buckets(n_seq, max_len),
            MODE=MODE_IDS[mode],
            CHUNK_T=CHUNK_T,
        )
    return grad_hidden
