"""Pure-torch reference for masked pooling (padded and packed layouts).

These are the ground truth for the Triton pooling kernels and the path the library
runs on CPU. Every mode accumulates in fp32 and returns the input dtype.

Modes (``POOLING_MODES``):
  * ``mean``          -- average of the pooled tokens.
  * ``weighted_mean`` -- the j-th pooled token (1-based) gets weight j, weights normalised
                         to sum to 1 (the official LLM2Vec ``weighted_mean``).
  * ``last``          -- the last pooled token.
  * ``first``         -- the first pooled token.

A row without any pooled token returns zeros, never NaN; unpooled tokens never reach the result
(not even as NaN/Inf).
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "weighted_mean", "last", "first")


def check_pooling_mode(mode: str) -> None:
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


def masked_pool_reference(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``hidden`` ``[B, L, D]`` over the tokens where ``mask`` ``[B, L]`` is true."""
    check_pooling_mode(mode)
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, L, D] and mask [B, L], got {tuple(hidden.shape)} and {tuple(mask.shape)}")
    # no tokens at all: nothing pooled (amax/amin below need a token); an ONNX trace never sees L = 0
    if not torch.jit.is_tracing() and hidden.shape[1] == 0:
        return hidden.new_zeros(hidden.shape[0], hidden.shape[2])
    m = mask.to(torch.bool)
    h32 = torch.where(m.unsqueeze(-1), hidden.float(), 0.0)  # NaN/Inf in unpooled tokens must not leak
    count = m.sum(dim=1)  # [B]
    if mode in ("mean", "weighted_mean"):
        if mode == "mean":
            w = m.float()
        else:
            w = torch.cumsum(m.float(), dim=1) * m.float()  # rank of each pooled token
        w = w / w.sum(dim=1, keepdim=True).clamp(min=1.0)
        out = torch.einsum("bl,bld->bd", w, h32)
    else:
        positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
        if mode == "last":
            idx = torch.where(m, positions, -1).amax(dim=1).clamp(min=0)
        else:
            idx = torch.where(m, positions, m.shape[1]).amin(dim=1).clamp(max=m.shape[1] - 1)
        out = h32[torch.arange(h32.shape[0], device=h32.device), idx]
        out = out * (count > 0).unsqueeze(1).float()
    return out.to(hidden.dtype)


def masked_pool_varlen_reference(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool packed ``hidden`` ``[T, D]``; sequence b owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``."""
    check_pooling_mode(mode)
    if hidden.dim() != 2 or pool_mask.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [T, D] and pool_mask [T], got {tuple(hidden.shape)} and {tuple(pool_mask.shape)}")
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    n_seq = lengths.numel()
    seg = torch.repeat_interleave(torch.arange(n_seq, device=hidden.device), lengths)
    m = pool_mask.to(torch.bool)
    mf = m.float()
    h32 = torch.where(m.unsqueeze(1), hidden.float(), 0.0)  # NaN/Inf in unpooled tokens must not leak
    count = torch.zeros(n_seq, device=hidden.device).index_add_(0, seg, mf)
    if mode in ("mean", "weighted_mean"):
        if mode == "mean":
            w = mf
        else:
            csum = torch.cumsum(mf, dim=0)
            start = torch.cat([csum.new_zeros(1), csum])[cu[:-1]]  # pooled tokens before each sequence
            w = (csum - start[seg]) * mf
        total = torch.zeros(n_seq, device=hidden.device).index_add_(0, seg, w)
        w = w / total.clamp(min=1.0)[seg]
        out = torch.zeros(n_seq, hidden.shape[1], device=hidden.device).index_add_(0, seg, h32 * w.unsqueeze(1))
    else:
        positions = torch.arange(hidden.shape[0], device=hidden.device)
        if mode == "last":
            cand = torch.where(m, positions, -1)
            idx = torch.full((n_seq,), -1, device=hidden.device, dtype=torch.long).scatter_reduce_(0, seg, cand, "amax")
        else:
            cand = torch.where(m, positions, hidden.shape[0])
            idx = torch.full((n_seq,), hidden.shape[0], device=hidden.device, dtype=torch.long).scatter_reduce_(0, seg, cand, "amin")
        valid = count > 0
        out = torch.zeros(n_seq, hidden.shape[1], device=hidden.device)
        out[valid] = h32[idx[valid]]
    return out.to(hidden.dtype)


def masked_pool_varlen_reference_backward(
    grad_out: torch.Tensor, cu_seqlens: torch.Tensor, pool_mask: torch.Tensor, mode: str, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient ``[T, D]`` (in ``dtype``) of :func:`masked_pool_varlen_reference` with respect to
    ``hidden`` for ``grad_out`` ``[B, D]``. Pooling is linear in ``hidden``: token ``t`` of sequence
    ``b`` gets ``weight[t] * grad_out[b]`` (mean: ``1/count``; weighted_mean: its normalised rank;
    last/first: 1 on the chosen token), unpooled tokens get zeros."""
    check_pooling_mode(mode)
    cu = cu_seqlens.to(device=grad_out.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    n_tokens = pool_mask.shape[0]
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=grad_out.device), lengths)
    mf = pool_mask.to(torch.bool).float()
    if mode == "mean":
        w = mf
    elif mode == "weighted_mean":
        csum = torch.cumsum(mf, dim=0)
        w = (csum - torch.cat([csum.new_zeros(1), csum])[cu[:-1]][seg]) * mf
    else:  # one-hot on the last / first pooled token of each sequence
        csum = torch.cumsum(mf, dim=0)
        before = torch.cat([csum.new_zeros(1), csum])[cu[:-1]][seg]  # pooled tokens before the sequence
        rank = (csum - before) * mf
        count = torch.zeros(lengths.numel(), device=grad_out.device).index_add_(0, seg, mf)
        w = (rank == (count[seg] if mode == "last" else 1.0)).float() * mf
    total = torch.zeros(lengths.numel(), device=grad_out.device).index_add_(0, seg, w) if mode in ("mean", "weighted_mean") else None
    if total is not None:
        w = w / total.clamp(min=1.0)[seg]
    grad = w[:, None] * grad_out.float()[seg] if n_tokens else grad_out.new_zeros((0, grad_out.shape[1]), dtype=torch.float32)
    return grad.to(dtype)
