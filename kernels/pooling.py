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

from ._dispatch import check_cu_seqlens, check_cu_seqlens_layout, max_length, resolve_backend, should_validate
from .pooling_reference import (
    POOLING_MODES,
    check_pooling_mode,
    masked_pool_reference,
    masked_pool_varlen_reference,
    masked_pool_varlen_reference_backward,
)

__all__ = ["POOLING_MODES", "masked_pool", "masked_pool_varlen"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ops():
    from . import pooling_triton  # lazy: triton is optional

    return pooling_triton


# ---------------------------------------------------------------------------------------------
# custom ops (the autograd layer), opaque to torch.compile: the packed reference's segment
# arithmetic has data-dependent shapes, the Triton launch needs ``max_len`` on the host.
# ``backend`` is already resolved to "triton" or "torch".
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("llm2vec_fast::masked_pool_varlen_fwd", mutates_args=())
def _pool_fwd_op(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, mask_u8: torch.Tensor, mode: str, max_len: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, D], stats int32 [B])``; ``stats`` is the Triton kernels' per-sequence statistic for
    the backward (zeros on the torch backend, whose backward needs none)."""
    if backend == "triton":
        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        return _triton_ops().pool_forward(hidden, cu_seqlens, mask_u8, mode, max_len)
    out = masked_pool_varlen_reference(hidden, cu_seqlens, mask_u8, mode)
    return out, torch.zeros(cu_seqlens.shape[0] - 1, dtype=torch.int32, device=hidden.device)


@_pool_fwd_op.register_fake
def _(hidden, cu_seqlens, mask_u8, mode, max_len, backend):
    n_seq = cu_seqlens.shape[0] - 1
    return hidden.new_empty((n_seq, hidden.shape[1])), hidden.new_empty((n_seq,), dtype=torch.int32)


@torch.library.custom_op("llm2vec_fast::masked_pool_varlen_bwd", mutates_args=())
def _pool_bwd_op(
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask_u8: torch.Tensor,
    stats: torch.Tensor,
    mode: str,
    max_len: int,
    hidden_like: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """Gradient ``[T, D]`` with respect to ``hidden`` (``hidden_like``: an empty tensor with its
    shape and dtype -- pooling is linear in ``hidden``, so its values are not needed)."""
    n_tokens, dtype = hidden_like.shape[0], hidden_like.dtype
    if backend == "triton":
        return _triton_ops().pool_backward(grad_out, cu_seqlens, mask_u8, stats, mode, n_tokens, dtype, max_len)
    return masked_pool_varlen_reference_backward(grad_out, cu_seqlens, mask_u8, mode, dtype)


@_pool_bwd_op.register_fake
def _(grad_out, cu_seqlens, mask_u8, stats, mode, max_len, hidden_like, backend):
    return hidden_like.new_empty((hidden_like.shape[0], grad_out.shape[1]))


def _pool_setup_context(ctx, inputs, output):
    hidden, cu_seqlens, mask_u8, mode, max_len, backend = inputs
    ctx.save_for_backward(cu_seqlens, mask_u8, output[1])
    ctx.args = (mode, max_len, backend, hidden.shape[0], hidden.dtype)  # hidden itself is not kept


def _pool_backward(ctx, grad_out, _grad_stats):
    cu_seqlens, mask_u8, stats = ctx.saved_tensors
    mode, max_len, backend, n_tokens, dtype = ctx.args
    hidden_like = grad_out.new_empty((n_tokens, 0), dtype=dtype)
    grad = _pool_bwd_op(grad_out, cu_seqlens, mask_u8, stats, mode, max_len, hidden_like, backend)
    return grad, None, None, None, None, None


_pool_fwd_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


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
    max_seqlen: int | None = None,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """Pool packed token states ``hidden`` ``[T, D]`` into ``[B, D]``.

    Args:
        hidden: ``[T, D]`` fp16/bf16/fp32, the sequences concatenated without padding.
        cu_seqlens: int32 ``[B+1]``: 0, cumulative lengths, ``T``; sequence ``b`` owns rows
            ``cu_seqlens[b]:cu_seqlens[b+1]`` (empty sequences allowed: they pool to zeros).
        pool_mask: ``[T]`` bool (or integer, non-zero = pooled): the tokens to pool.
        mode: one of ``mean``, ``weighted_mean``, ``last``, ``first``.
        max_seqlen: the longest sequence. It sizes the Triton kernels' grid (``mean`` and
            ``weighted_mean`` split each sequence into chunks of rows across programs): an upper
            bound costs idle programs, a smaller value is still correct (a sequence's last chunk
            program takes the rest) but slower. ``None`` reads it from ``cu_seqlens`` (one
            device-to-host copy on a GPU): pass it, as :func:`llm2vec_fast.packing.pack` does, to
            keep the call sync-free.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).
        validate: check ``cu_seqlens``' values on the host, as in
            :func:`~llm2vec_fast.kernels.flash_attn_varlen` (``None``: only when free -- a CPU tensor,
            not compiling).

    Runs as ``torch.ops.llm2vec_fast.masked_pool_varlen_fwd`` (backward ``..._bwd``), custom ops with
    fake implementations, so ``torch.compile(fullgraph=True)`` traces it without a graph break.

    Returns:
        ``[B, D]`` in ``hidden``'s dtype; zeros for a sequence without pooled tokens.
        Differentiable with respect to ``hidden``.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``cu_seqlens`` or ``mode``.
    """
    check_pooling_mode(mode)
    _check_hidden_and_mask(hidden, pool_mask, 2, "hidden [T, D] and pool_mask [T]")
    check_cu_seqlens_layout(cu_seqlens)
    if max_seqlen is None or should_validate(validate, cu_seqlens):
        longest = max_length(check_cu_seqlens(cu_seqlens, hidden.shape[0]))
        if max_seqlen is not None and int(max_seqlen) < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")
        max_seqlen = longest if max_seqlen is None else max_seqlen
    backend = resolve_backend(backend, (hidden, pool_mask))
    cu_seqlens = cu_seqlens.to(hidden.device, non_blocking=True)
    out, _ = torch.ops.llm2vec_fast.masked_pool_varlen_fwd(hidden, cu_seqlens, _as_bytes(pool_mask), mode, int(max_seqlen), backend)
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
    flat = hidden.reshape(n_seq * seq_len, d)
    out, _ = torch.ops.llm2vec_fast.masked_pool_varlen_fwd(flat, cu_seqlens, _as_bytes(mask), mode, seq_len, "triton")
    return out
