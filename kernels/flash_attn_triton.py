"""Triton kernels for packed (varlen) bidirectional attention with GQA, forward and backward.

FlashAttention-2 structure:

* forward: one program per (query block, q head, sequence); streams the sequence's key/value
  blocks with an online softmax (base-2 exponentials, ``qk_scale = softmax_scale * log2(e)``) and
  stores the output plus the base-2 log-sum-exp ``lse`` (``[Hq, T]`` fp32).
* backward: ``delta = rowsum(dO * O)`` (preprocess), then a dK/dV kernel -- one program per (key
  block, kv head, sequence) that loops over the q heads of its GQA group and over the sequence's
  query blocks, so dK/dV are accumulated in registers without atomics -- and a separate dQ kernel
  with one program per (query block, q head, sequence).

Grids are sized for ``max_seqlen``; a program whose block starts past the end of its sequence
exits at once. ``cu_seqlens`` is read inside the kernels. Inner loops run unmasked over full blocks
and masked only over the last, partial one. Head dims that are not powers of two (80, 96) use a
power-of-two ``BLOCK_D`` with masked loads/stores.

This module imports triton at import time; :mod:`llm2vec_fast.kernels.flash_attn` imports it lazily.
On the interpreter (``TRITON_INTERPRET=1`` before import) a single small config is used per kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import autotune_cache_kwargs, interpreter_enabled, new_output, next_power_of_2

#: Whether the kernels below were built for the Triton interpreter (decided when triton.jit ran).
INTERPRETED = interpreter_enabled()
#: Autotune choices are cached on disk where Triton supports it (warm start of a new process).
AUTOTUNE_CACHE = autotune_cache_kwargs(triton.autotune)

LOG2E = 1.4426950408889634
#: ``(dropout_p, seed, offset)`` of a launch without attention dropout.
NO_DROPOUT = (0.0, 0, 0)
_MAX_GRID_YZ = 65535


# --------------------------------------------------------------------------------------------
# autotune configs
# --------------------------------------------------------------------------------------------


def _configs(gpu_table, interp_cfg):
    """Configs for one kernel: ``gpu_table`` rows ``(max_block_d, block_m, block_n, warps, stages)``."""
    if INTERPRETED:
        return [triton.Config(dict(zip(("BLOCK_M", "BLOCK_N"), interp_cfg)), num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "MAX_BLOCK_D": bd}, num_warps=w, num_stages=s) for bd, bm, bn, w, s in gpu_table]


def _prune_by_head_dim(configs, named_args, **kwargs):
    """Keep the configs whose ``MAX_BLOCK_D`` class matches this launch's ``BLOCK_D``."""
    block_d = {**named_args, **kwargs}["BLOCK_D"]
    if "MAX_BLOCK_D" not in configs[0].kwargs:
        return configs
    klass = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    kept = [c for c in configs if c.kwargs["MAX_BLOCK_D"] == klass]
    return kept or configs[:1]


# (head-dim class, BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen with the compile check
# (``python -m llm2vec_fast.kernels.compile_check``, real-launch specialisation: aligned pointers and
# strides) in the heaviest variant -- dropout and soft-capping on, head dim 80 for the 128 class (its
# masked loads need the most registers) -- for sm_80 and sm_90: every row compiles without register
# spills and within shared memory on both (tests/test_gpu_compile.py keeps it so). The sweep (regs,
# spills, smem, wgmma per config) is in benchmarks/GPU_NOTES.md. Two configs per class: compile time
# on a fresh machine (and in the compile check) grows with every row.
_FWD_TABLE = [
    (64, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 3),
    (256, 32, 64, 8, 2),
    (256, 32, 16, 8, 2),
]
# dK/dV kernel: BLOCK_N key rows stay resident, BLOCK_M query rows stream.
_BWD_KV_TABLE = [
    (64, 16, 64, 4, 3),
    (64, 32, 32, 4, 3),
    (128, 32, 32, 8, 2),
    (128, 16, 32, 8, 2),
    (256, 16, 32, 8, 1),
    (256, 32, 32, 8, 1),
]
# dQ kernel: BLOCK_M query rows stay resident, BLOCK_N key rows stream.
_BWD_Q_TABLE = [
    (64, 128, 32, 8, 3),
    (64, 64, 64, 8, 3),
    (128, 32, 32, 8, 2),
    (128, 32, 32, 4, 2),
    (256, 16, 32, 8, 1),
    (256, 16, 16, 8, 1),
]

_AUTOTUNE_KEY = ["BLOCK_D", "GROUP", "seq_bucket", "SOFTCAP", "DROPOUT"]
#: Integer arguments Triton would otherwise specialise on (== 1, divisible by 16), each value class a
#: new compile of every config: the Philox seed/offset and the per-batch sizes (``n_tokens``, its
#: ``stride_lh`` and ``mask_stride`` only index dropout counters and LSE rows, whose base ``row0`` is
#: loaded from ``cu_seqlens`` anyway; ``seq_bucket`` is only an autotune key). One binary per config
#: whatever the batch: fewer compiles on a fresh machine and in the kernel tests.
_NOT_SPECIALIZED = ["seed", "offset", "n_tokens", "mask_stride", "stride_lh", "seq_bucket"]
_PRUNE = {"early_config_prune": _prune_by_head_dim}


# --------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, rows, stride, offs_d, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Load ``[len(rows), BLOCK_D]`` from ``base + rows * stride + d``; zero past ``n_rows`` / ``D``."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    if MASK_ROWS:
        if D == BLOCK_D:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, stride, offs_d, n_rows, x, D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _block_coords(CU, BLOCK: tl.constexpr):
    """Grid ``(row block, head, sequence)`` -> (first row of the sequence as int64, its length,
    first row of this program's block within the sequence, head index)."""
    b = tl.program_id(2)
    seq_start = tl.load(CU + b)
    seq_len = tl.load(CU + b + 1) - seq_start
    return seq_start.to(tl.int64), seq_len, tl.program_id(0) * BLOCK, tl.program_id(1)


@triton.jit
def _tanh(x):
    # tanh from exp2 (saturates cleanly to +-1): libdevice/tl.math tanh differ across Triton versions
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _logits(s, qk_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Raw ``q . k`` -> softmax logits in base-2 units, and ``tanh`` of the soft-capped scores
    (without capping the second value is unused: the compiler drops it). Capping: ``softcap * tanh(s * softmax_scale / softcap)``, so
    ``qk_scale = softmax_scale / softcap`` and ``cap_scale = softcap * log2(e)``; without it
    ``qk_scale = softmax_scale * log2(e)``."""
    if SOFTCAP:
        t = _tanh(s * qk_scale)
        return t * cap_scale, t
    else:
        return s * qk_scale, s


@triton.jit
def _dropout_keep(seed, offset, h, n_tokens, mask_stride, row0, rows, start_n, dropout_p, BLOCK_N: tl.constexpr):
    """Philox keep-mask ``[len(rows), BLOCK_N]`` of query ``row0 + rows`` (global row) against keys
    ``start_n + arange(BLOCK_N)`` (within the sequence; ``start_n`` a multiple of 4) for q head ``h``.

    One Philox counter yields 4 uniforms (``rand4x``) for 4 neighbouring keys: the counter of
    ``(h, t, j)`` is ``offset + (h * n_tokens + t) * mask_stride + j // 4`` (``mask_stride =
    ceil(max_seqlen / 4)``), independent of the block sizes, so the forward, both backward kernels
    and :func:`dropout_keep_mask` regenerate the same mask; a quarter of the Philox work and
    registers of one counter per element."""
    t = row0 + rows.to(tl.int64)
    quads = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    idx = offset + (h.to(tl.int64) * n_tokens + t)[:, None] * mask_stride + quads.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.rand4x(seed, idx)
    u = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (rows.shape[0], BLOCK_N))
    return u >= dropout_p


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(
    acc,
    l_i,
    m_i,
    q,
    K_seq,
    V_seq,
    start_n,
    seq_len,
    stride_kt,
    stride_vt,
    qk_scale,
    cap_scale,
    offs_n,
    offs_d,
    seed,
    offset,
    h,
    n_tokens,
    mask_stride,
    row0,
    offs_m,
    dropout_p,
    drop_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    cols = start_n + offs_n
    k = _load_rows(K_seq, cols, stride_kt, offs_d, seq_len, D, BLOCK_D, MASK_N)
    s, _ = _logits(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale, cap_scale, SOFTCAP)
    if MASK_N:
        s = tl.where((cols < seq_len)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, offset, h, n_tokens, mask_stride, row0, offs_m, start_n, dropout_p, offs_n.shape[0])
        p = tl.where(keep, p * drop_scale, 0.0)
    v = _load_rows(V_seq, cols, stride_vt, offs_d, seq_len, D, BLOCK_D, MASK_N)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=_configs(_FWD_TABLE, (64, 32)), key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE, **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    CU,
    qk_scale,
    cap_scale,
    seed,
    offset,
    n_tokens,
    mask_stride,
    dropout_p,
    drop_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    seq_bucket,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_BLOCK_D: tl.constexpr = 0,
):
    row0, seq_len, start_m, h = _block_coords(CU, BLOCK_M)
    if start_m >= seq_len:
        return
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q_seq = Q + row0 * stride_qt + h * stride_qh
    K_seq = K + row0 * stride_kt + hk * stride_kh
    V_seq = V + row0 * stride_vt + hk * stride_vh

    q = _load_rows(Q_seq, offs_m, stride_qt, offs_d, seq_len, D, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            K_seq,
            V_seq,
            start_n,
            seq_len,
            stride_kt,
            stride_vt,
            qk_scale,
            cap_scale,
            offs_n,
            offs_d,
            seed,
            offset,
            h,
            n_tokens,
            mask_stride,
            row0,
            offs_m,
            dropout_p,
            drop_scale,
            D,
            BLOCK_D,
            False,
            PRECISION,
            SOFTCAP,
            DROPOUT,
        )
    if n_full < seq_len:
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            K_seq,
            V_seq,
            n_full,
            seq_len,
            stride_kt,
            stride_vt,
            qk_scale,
            cap_scale,
            offs_n,
            offs_d,
            seed,
            offset,
            h,
            n_tokens,
            mask_stride,
            row0,
            offs_m,
            dropout_p,
            drop_scale,
            D,
            BLOCK_D,
            True,
            PRECISION,
            SOFTCAP,
            DROPOUT,
        )
    acc = acc / l_i[:, None]
    _store_rows(O + row0 * stride_ot + h * stride_oh, offs_m, stride_ot, offs_d, seq_len, acc, D)
    tl.store(LSE + h * stride_lh + row0 + offs_m, m_i + tl.log2(l_i), mask=offs_m < seq_len)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    n_tokens,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]`` in fp32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + h * stride_oh, rows, stride_ot, offs_d, n_tokens, D, BLOCK_D, True)
    do = _load_rows(DO + h * stride_doh, rows, stride_dot, offs_d, n_tokens, D, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * stride_dh + rows, delta, mask=rows < n_tokens)


@triton.jit
def _dkdv_block(
    dk,
    dv,
    k,
    v,
    Q_seq,
    DO_seq,
    LSE_seq,
    DELTA_seq,
    start_m,
    seq_len,
    stride_qt,
    stride_dot,
    qk_scale,
    cap_scale,
    offs_m,
    offs_d,
    seed,
    offset,
    h,
    n_tokens,
    mask_stride,
    row0,
    offs_n,
    offs_n_start,
    dropout_p,
    drop_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    rows = start_m + offs_m
    q = _load_rows(Q_seq, rows, stride_qt, offs_d, seq_len, D, BLOCK_D, MASK_M)
    do = _load_rows(DO_seq, rows, stride_dot, offs_d, seq_len, D, BLOCK_D, MASK_M)
    if MASK_M:
        # lse = +inf turns the probabilities of rows past the sequence into exact zeros
        lse = tl.load(LSE_seq + rows, mask=rows < seq_len, other=float("inf"))
        delta = tl.load(DELTA_seq + rows, mask=rows < seq_len, other=0.0)
    else:
        lse = tl.load(LSE_seq + rows)
        delta = tl.load(DELTA_seq + rows)
    s_t, t_t = _logits(tl.dot(k, tl.trans(q), input_precision=PRECISION), qk_scale, cap_scale, SOFTCAP)
    p_t = tl.exp2(s_t - lse[None, :])  # [BLOCK_N, BLOCK_M]
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if DROPOUT:  # dV sees the dropped probabilities; dP flows back through the same mask
        keep_t = tl.trans(_dropout_keep(seed, offset, h, n_tokens, mask_stride, row0, rows, offs_n_start, dropout_p, offs_n.shape[0]))
        dv = tl.dot(tl.where(keep_t, p_t * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:  # d/ds [softcap * tanh(s * scale / softcap)] = scale * (1 - tanh^2); scale is applied at the end
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs(_BWD_KV_TABLE, (32, 64)), key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE, **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU,
    qk_scale,
    cap_scale,
    sm_scale,
    seed,
    offset,
    n_tokens,
    mask_stride,
    dropout_p,
    drop_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lh,
    seq_bucket,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_BLOCK_D: tl.constexpr = 0,
):
    row0, seq_len, start_n, hk = _block_coords(CU, BLOCK_N)
    if start_n >= seq_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + row0 * stride_kt + hk * stride_kh, offs_n, stride_kt, offs_d, seq_len, D, BLOCK_D, True)
    v = _load_rows(V + row0 * stride_vt + hk * stride_vh, offs_n, stride_vt, offs_d, seq_len, D, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (seq_len // BLOCK_M) * BLOCK_M
    for g in range(GROUP):  # the q heads that share this kv head: no atomics needed
        h = hk * GROUP + g
        Q_seq = Q + row0 * stride_qt + h * stride_qh
        DO_seq = DO + row0 * stride_dot + h * stride_doh
        LSE_seq = LSE + h * stride_lh + row0
        DELTA_seq = DELTA + h * stride_lh + row0
        for start_m in range(0, m_full, BLOCK_M):
            dk, dv = _dkdv_block(
                dk,
                dv,
                k,
                v,
                Q_seq,
                DO_seq,
                LSE_seq,
                DELTA_seq,
                start_m,
                seq_len,
                stride_qt,
                stride_dot,
                qk_scale,
                cap_scale,
                offs_m,
                offs_d,
                seed,
                offset,
                h,
                n_tokens,
                mask_stride,
                row0,
                offs_n,
                start_n,
                dropout_p,
                drop_scale,
                D,
                BLOCK_D,
                False,
                PRECISION,
                SOFTCAP,
                DROPOUT,
            )
        if m_full < seq_len:
            dk, dv = _dkdv_block(
                dk,
                dv,
                k,
                v,
                Q_seq,
                DO_seq,
                LSE_seq,
                DELTA_seq,
                m_full,
                seq_len,
                stride_qt,
                stride_dot,
                qk_scale,
                cap_scale,
                offs_m,
                offs_d,
                seed,
                offset,
                h,
                n_tokens,
                mask_stride,
                row0,
                offs_n,
                start_n,
                dropout_p,
                drop_scale,
                D,
                BLOCK_D,
                True,
                PRECISION,
                SOFTCAP,
                DROPOUT,
            )
    _store_rows(DK + row0 * stride_dkt + hk * stride_dkh, offs_n, stride_dkt, offs_d, seq_len, dk * sm_scale, D)
    _store_rows(DV + row0 * stride_dvt + hk * stride_dvh, offs_n, stride_dvt, offs_d, seq_len, dv, D)


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse,
    delta,
    K_seq,
    V_seq,
    start_n,
    seq_len,
    stride_kt,
    stride_vt,
    qk_scale,
    cap_scale,
    offs_n,
    offs_d,
    seed,
    offset,
    h,
    n_tokens,
    mask_stride,
    row0,
    offs_m,
    dropout_p,
    drop_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    cols = start_n + offs_n
    k = _load_rows(K_seq, cols, stride_kt, offs_d, seq_len, D, BLOCK_D, MASK_N)
    v = _load_rows(V_seq, cols, stride_vt, offs_d, seq_len, D, BLOCK_D, MASK_N)
    s, t = _logits(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale, cap_scale, SOFTCAP)
    p = tl.exp2(s - lse[:, None])
    if MASK_N:
        p = tl.where((cols < seq_len)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, offset, h, n_tokens, mask_stride, row0, offs_m, start_n, dropout_p, offs_n.shape[0])
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.autotune(configs=_configs(_BWD_Q_TABLE, (64, 32)), key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE, **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU,
    qk_scale,
    cap_scale,
    sm_scale,
    seed,
    offset,
    n_tokens,
    mask_stride,
    dropout_p,
    drop_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lh,
    seq_bucket,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_BLOCK_D: tl.constexpr = 0,
):
    row0, seq_len, start_m, h = _block_coords(CU, BLOCK_M)
    if start_m >= seq_len:
        return
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + row0 * stride_qt + h * stride_qh, offs_m, stride_qt, offs_d, seq_len, D, BLOCK_D, True)
    do = _load_rows(DO + row0 * stride_dot + h * stride_doh, offs_m, stride_dot, offs_d, seq_len, D, BLOCK_D, True)
    lse = tl.load(LSE + h * stride_lh + row0 + offs_m, mask=offs_m < seq_len, other=0.0)
    delta = tl.load(DELTA + h * stride_lh + row0 + offs_m, mask=offs_m < seq_len, other=0.0)
    K_seq = K + row0 * stride_kt + hk * stride_kh
    V_seq = V + row0 * stride_vt + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(
            dq,
            q,
            do,
            lse,
            delta,
            K_seq,
            V_seq,
            start_n,
            seq_len,
            stride_kt,
            stride_vt,
            qk_scale,
            cap_scale,
            offs_n,
            offs_d,
            seed,
            offset,
            h,
            n_tokens,
            mask_stride,
            row0,
            offs_m,
            dropout_p,
            drop_scale,
            D,
            BLOCK_D,
            False,
            PRECISION,
            SOFTCAP,
            DROPOUT,
        )
    if n_full < seq_len:
        dq = _dq_block(
            dq,
            q,
            do,
            lse,
            delta,
            K_seq,
            V_seq,
            n_full,
            seq_len,
            stride_kt,
            stride_vt,
            qk_scale,
            cap_scale,
            offs_n,
            offs_d,
            seed,
            offset,
            h,
            n_tokens,
            mask_stride,
            row0,
            offs_m,
            dropout_p,
            drop_scale,
            D,
            BLOCK_D,
            True,
            PRECISION,
            SOFTCAP,
            DROPOUT,
        )
    _store_rows(DQ + row0 * stride_dqt + h * stride_dqh, offs_m, stride_dqt, offs_d, seq_len, dq * sm_scale, D)


@triton.jit(do_not_specialize=["seed", "offset"])
def _dropout_mask_kernel(
    MASK, CU, seed, offset, n_tokens, mask_stride, dropout_p, stride_mh, stride_mt, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Writes the attention kernels' keep-mask: ``MASK[h, t, j]`` for key ``j`` of row ``t``'s sequence."""
    row0, seq_len, start_m, h = _block_coords(CU, BLOCK_M)
    if start_m >= seq_len:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, offset, h, n_tokens, mask_stride, row0, rows, start_n, dropout_p, BLOCK_N)
        ptrs = MASK + h * stride_mh + (row0 + rows.to(tl.int64))[:, None] * stride_mt + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows < seq_len)[:, None] & (cols < seq_len)[None, :])


# --------------------------------------------------------------------------------------------
# launchers (inputs are validated by llm2vec_fast.kernels.flash_attn)
# --------------------------------------------------------------------------------------------


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton attention kernels were built without the interpreter; CPU tensors need "
            "TRITON_INTERPRET=1 set before triton is imported"
        )


def _logit_scales(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """``(qk_scale, cap_scale)`` for :func:`_logits`."""
    if softcap > 0.0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 1.0


def _dropout_args(q: torch.Tensor, max_seqlen: int, dropout: tuple[float, int, int]) -> tuple:
    """``(seed, offset, n_tokens, mask_stride, dropout_p, 1 / (1 - dropout_p))`` kernel arguments."""
    dropout_p, seed, offset = dropout
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
    return seed, offset, q.shape[0], _mask_stride(max_seqlen), float(dropout_p), keep_scale


def _mask_stride(max_seqlen: int) -> int:
    """Philox counters per (head, query row): one per 4 keys."""
    return max((max_seqlen + 3) // 4, 1)


def _launch_meta(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, softcap: float, dropout_p: float) -> dict:
    n_seq = cu_seqlens.numel() - 1
    if n_seq > _MAX_GRID_YZ or q.shape[1] > _MAX_GRID_YZ:
        raise ValueError(f"at most {_MAX_GRID_YZ} sequences per call, got {n_seq}")
    return dict(
        seq_bucket=min(next_power_of_2(max(max_seqlen, 1)), 16384),
        GROUP=q.shape[1] // k.shape[1],
        D=q.shape[2],
        BLOCK_D=max(16, next_power_of_2(q.shape[2])),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SOFTCAP=softcap > 0.0,
        DROPOUT=dropout_p > 0.0,
    )


def attention_forward(
    q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float, softcap: float = 0.0, dropout: tuple[float, int, int] = NO_DROPOUT
):
    """Returns ``(out [T, Hq, D], lse [Hq, T] fp32, base-2 log-sum-exp of the (capped) logits)``.

    ``dropout = (p, seed, offset)``: attention dropout with the Philox mask of :func:`_dropout_keep`."""
    _check_device(q)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    n_tokens, n_heads, _ = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((n_heads, n_tokens), torch.float32, q.device)
    n_seq = cu_seqlens.numel() - 1
    meta = _launch_meta(q, k, cu_seqlens, max_seqlen, softcap, dropout[0])
    if n_tokens == 0:
        return out, lse

    def grid(cfg):
        return (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), n_heads, n_seq)

    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        *_logit_scales(softmax_scale, softcap),
        *_dropout_args(q, max_seqlen, dropout),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        **meta,
    )
    return out, lse


def attention_backward(
    do,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens,
    max_seqlen: int,
    softmax_scale: float,
    softcap: float = 0.0,
    dropout: tuple[float, int, int] = NO_DROPOUT,
):
    """Returns ``(dq, dk, dv)`` for :func:`attention_forward`'s output gradient ``do``."""
    _check_device(q)
    do, q, k, v = (_last_dim_contiguous(t) for t in (do, q, k, v))
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    n_seq = cu_seqlens.numel() - 1
    meta = _launch_meta(q, k, cu_seqlens, max_seqlen, softcap, dropout[0])
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if n_tokens == 0:
        return dq, dk, dv
    delta = new_output((n_heads, n_tokens), torch.float32, q.device)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(n_tokens, block_t), n_heads)](
        out,
        do,
        delta,
        n_tokens,
        out.stride(0),
        out.stride(1),
        do.stride(0),
        do.stride(1),
        delta.stride(0),
        D=head_dim,
        BLOCK_D=meta["BLOCK_D"],
        BLOCK_T=block_t,
    )
    scales = (*_logit_scales(softmax_scale, softcap), softmax_scale, *_dropout_args(q, max_seqlen, dropout))
    common_strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))

    def kv_grid(cfg):
        return (triton.cdiv(max_seqlen, cfg["BLOCK_N"]), n_kv_heads, n_seq)

    _attn_bwd_dkdv_kernel[kv_grid](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        cu_seqlens,
        *scales,
        *common_strides,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        lse.stride(0),
        **meta,
    )

    def q_grid(cfg):
        return (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), n_heads, n_seq)

    _attn_bwd_dq_kernel[q_grid](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        cu_seqlens,
        *scales,
        *common_strides,
        dq.stride(0),
        dq.stride(1),
        lse.stride(0),
        **meta,
    )
    return dq, dk, dv


def dropout_keep_mask(cu_seqlens: torch.Tensor, n_heads: int, max_seqlen: int, dropout_p: float, seed: int, offset: int) -> torch.Tensor:
    """The kernels' keep-mask, bool ``[n_heads, T, max_seqlen]``: ``mask[h, t, j]`` keeps the probability
    of query row ``t`` on key ``j`` of its own sequence (columns past the sequence are False)."""
    n_tokens = int(cu_seqlens[-1])
    mask = torch.zeros((n_heads, n_tokens, max(max_seqlen, 1)), dtype=torch.int8, device=cu_seqlens.device)
    if n_tokens == 0 or max_seqlen == 0:
        return mask.bool()
    block_m, block_n = 32, 32
    _dropout_mask_kernel[(triton.cdiv(max_seqlen, block_m), n_heads, cu_seqlens.numel() - 1)](
        mask,
        cu_seqlens,
        seed,
        offset,
        n_tokens,
        _mask_stride(max_seqlen),
        float(dropout_p),
        mask.stride(0),
        mask.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return mask.bool()
