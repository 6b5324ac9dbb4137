"""Masked pooling of token states into one vector per sequence: public entry points and autograd.

``masked_pool`` takes the padded layout (``hidden`` ``[B, L, D]``, ``mask`` ``[B, L]``),
``masked_pool_varlen`` the packed one (``hidden`` ``[T, D]``, ``cu_seqlens`` ``[B+1]``, ``pool_mask``
``[T]``). The mask selects the tokens to pool (LLM2Vec pools over the document tokens, not the
instruction); modes are listed in :data:`POOLING_MODES` and defined by
:mod:`.pooling_reference`, the ground truth and CPU path. A sequence without pooled tokens yields
zeros. Output dtype = input dtype, accumulation in fp32.

Backend rule as for attention: ``"auto"`` runs the Triton kernels (:mod:`.pooling_triton`) on CUDA
tensors and the torch reference otherwise; ``"triton"`` forces the kernels (CPU only under
``TRITON_INTERPRET=1``); ``"torch"`` forces the reference.
"""

from __future__ import annotations

import torch

from ._dispatch import check_cu_seqlens, max_length, resolve_backend
from .pooling_reference import (
    POOLING_MODES,
    check_pooling_mode,
    masked_pool_reference,
    masked_pool_varlen_reference,
)

__all__ = ["POOLING_MODES", "MaskedPoolVarlenFunction", "masked_pool", "masked_pool_varlen"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ops():
    from . import pooling_triton  # lazy: triton is optional

    return pooling_triton


class MaskedPoolVarlenFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, fused Triton backward (gradient w.r.t. ``hidden`` only).

    ``forward(hidden [T, D], cu_seqlens int32 [B+1], mask_u8 uint8 [T], mode, max_len)``;
    inputs are assumed validated (use :func:`masked_pool_varlen`).
    """

    @staticmethod
    def forward(ctx, hidden, cu_seqlens, mask_u8, mode, max_len):
        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        out, stats = _triton_ops().pool_forward(hidden, cu_seqlens, mask_u8, mode, max_len)
        ctx.save_for_backward(cu_seqlens, mask_u8, stats)
        ctx.mode, ctx.max_len = mode, max_len
        ctx.n_tokens, ctx.hidden_dtype = hidden.shape[0], hidden.dtype
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_stats):
        cu_seqlens, mask_u8, stats = ctx.saved_tensors
        grad_hidden = _triton_ops().pool_backward(
            grad_out, cu_seqlens, mask_u8, stats, ctx.mode, ctx.n_tokens, ctx.hidden_dtype, ctx.max_len
        )
        return grad_hidden, None, None, None, None


def _check_hidden_and_mask(hidden, mask, rank: int, layout: str) -> None:
    if not isinstance(hidden, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise ValueError("hidden and the mask must be torch.Tensors")
    if hidden.dim() != rank or mask.shape != hidden.shape[: rank - 1]:
        raise ValueError(f"expected {layout}, got hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} is not supported; expected one of {_FLOAT_DTYPES}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"the mask must be bool or integer, got {mask.dtype}")
    if mask.device != hidden.device:
        raise ValueError(f"hidden ({hidden.device}) and the mask ({mask.device}) must be on one device")


def _as_bytes(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.reshape(-1)
    if mask.dtype == torch.bool:
        return mask.contiguous().view(torch.uint8)
    return (mask != 0).to(torch.uint8)


def masked_pool_varlen(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pool_mask: torch.Tensor,
    mode: str,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Pool packed token states ``hidden`` ``[T, D]`` into ``[B, D]``.

    Args:
        hidden: ``[T, D]`` fp16/bf16/fp32, the sequences concatenated without padding.
        cu_seqlens: int32 ``[B+1]``: 0, cumulative lengths, ``T``; sequence ``b`` owns rows
            ``cu_seqlens[b]:cu_seqlens[b+1]`` (empty sequences allowed: they pool to zeros).
        pool_mask: ``[T]`` bool (or integer, non-zero = pooled): the tokens to pool.
        mode: one of ``mean``, ``weighted_mean``, ``last``, ``first``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).

    Returns:
        ``[B, D]`` in ``hidden``'s dtype; zeros for a sequence without pooled tokens.
        Differentiable with respect to ``hidden``.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``cu_seqlens`` or ``mode``.
    """
    check_pooling_mode(mode)
    _check_hidden_and_mask(hidden, pool_mask, 2, "hidden [T, D] and pool_mask [T]")
    bounds = check_cu_seqlens(cu_seqlens, hidden.shape[0])
    if resolve_backend(backend, (hidden, pool_mask)) == "torch":
        return masked_pool_varlen_reference(hidden, cu_seqlens, pool_mask, mode)
    cu_seqlens = cu_seqlens.to(hidden.device, non_blocking=True)
    out, _ = MaskedPoolVarlenFunction.apply(hidden, cu_seqlens, _as_bytes(pool_mask), mode, max_length(bounds))
    return out


def masked_pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, *, backend: str = "auto") -> torch.Tensor:
    """Pool padded token states ``hidden`` ``[B, L, D]`` over the tokens where ``mask`` ``[B, L]`` is true.

    Same modes, dtypes, zero rule and backend rule as :func:`masked_pool_varlen` (the Triton path
    runs the varlen kernel on the ``[B * L, D]`` view with ``cu_seqlens = b * L``). Returns ``[B, D]``.
    """
    check_pooling_mode(mode)
    _check_hidden_and_mask(hidden, mask, 3, "hidden [B, L, D] and mask [B, L]")
    if resolve_backend(backend, (hidden, mask)) == "torch":
        return masked_pool_reference(hidden, mask, mode)
    n_seq, seq_len, d = hidden.shape
    cu_seqlens = torch.arange(0, n_seq + 1, dtype=torch.int32, device=hidden.device) * seq_len
    out, _ = MaskedPoolVarlenFunction.apply(hidden.reshape(n_seq * seq_len, d), cu_seqlens, _as_bytes(mask), mode, seq_len)
    return out
