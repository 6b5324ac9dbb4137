"""Packed (varlen) bidirectional attention: public entry point and autograd Function.

LLM2Vec turns a causal decoder into an encoder by letting every token attend to every token of its
own sequence. With packed batches (no padding) that is block-diagonal attention over
``[T, H, D]`` tensors, the layout of flash-attention's ``flash_attn_varlen_func``:

    sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of ``q``, ``k`` and ``v``, and each of
    those rows attends to all rows of the same sequence (not causal), nothing else.

Layering (like Liger-Kernel): the Triton kernels and their launchers live in
:mod:`.flash_attn_triton`, the pure-torch references in :mod:`.flash_attn_reference`; this file
validates inputs, picks the backend and wires the Triton forward/backward into autograd.
"""

from __future__ import annotations

import math
import operator

import torch

from ._dispatch import check_cu_seqlens, max_length, resolve_backend
from .flash_attn_reference import flash_attn_varlen_reference

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ops():
    from . import flash_attn_triton  # lazy: triton is optional and only needed here

    return flash_attn_triton


class FlashAttnVarlenFunction(torch.autograd.Function):
    """Autograd wrapper around the Triton forward and backward kernels.

    ``forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap)`` saves ``q, k, v``, the output and the
    fp32 log-sum-exp; ``backward`` recomputes the attention probabilities block by block
    (FlashAttention-2) and returns ``dq, dk, dv`` in the input dtypes. Inputs are assumed validated
    (call :func:`flash_attn_varlen`); the backward is not itself differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap=0.0):
        out, lse = _triton_ops().attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.softmax_scale = softmax_scale
        ctx.softcap = softcap
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _triton_ops().attention_backward(
            grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale, ctx.softcap
        )
        return dq, dk, dv, None, None, None, None


def _check_inputs(q, k, v, cu_seqlens, max_seqlen) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, D] (3-D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (n_tokens, n_heads_q, head_dim), n_heads_kv = q.shape, k.shape[1]
    if k.shape[0] != n_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on T and D")
    if n_heads_kv == 0 or n_heads_q % n_heads_kv != 0:
        raise ValueError(f"the number of q heads ({n_heads_q}) must be a multiple of kv heads ({n_heads_kv})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    try:
        max_seqlen = operator.index(max_seqlen)
    except TypeError:
        raise ValueError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}") from None
    bounds = check_cu_seqlens(cu_seqlens, n_tokens)
    longest = max_length(bounds)
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")
    return max_seqlen


def _check_softcap(softcap) -> float:
    """``None`` or 0 turn capping off; otherwise a finite positive float."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise ValueError(f"softcap must be a float >= 0 (0 or None: no capping), got {softcap!r}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 or None: no capping), got {softcap!r}")
    return softcap


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    *,
    softcap: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional attention over a packed batch of variable-length sequences.

    Args:
        q: ``[T, Hq, D]`` queries, all sequences concatenated along ``T`` without padding.
        k: ``[T, Hkv, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention:
            q head ``h`` reads kv head ``h // (Hq // Hkv)``).
        v: ``[T, Hkv, D]`` values.
        cu_seqlens: int32 ``[B+1]`` offsets: 0, then cumulative sequence lengths, ending at ``T``.
            Lengths may be any size >= 0 (1 included). Copied to ``q``'s device if needed.
        max_seqlen: an upper bound on the sequence lengths (sizes the kernel grid); may exceed the
            longest sequence, must not be smaller.
        softmax_scale: scale of ``q @ k^T`` before the softmax; default ``1 / sqrt(D)``.
        softcap: tanh soft-capping of the attention logits (Gemma2's ``attn_logit_softcapping``,
            FlashAttention's ``softcap``): the logits become
            ``softcap * tanh(q @ k^T * softmax_scale / softcap)`` -- scaled first, then capped, as in
            transformers' Gemma2 eager attention. ``0`` (or ``None``) disables capping. The backward
            applies the ``1 - tanh^2`` derivative.
        backend: ``"auto"`` (Triton on CUDA tensors, the torch reference on CPU), ``"triton"``
            (force the kernels; on CPU only under ``TRITON_INTERPRET=1``, for tests) or ``"torch"``
            (force the reference: one ``scaled_dot_product_attention`` call per sequence).

    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype. Differentiable with respect to ``q``, ``k`` and ``v``.

    Supported: D in {32, 64, 80, 96, 128, 256}; fp16 and bf16 (fp32 works too, with IEEE-precision
    dots, mainly for testing). Softmax statistics and accumulators are fp32.

    Raises:
        ValueError: wrong ranks or shapes, ``Hq % Hkv != 0``, unsupported head dim or dtype, mixed
            dtypes/devices, ``cu_seqlens`` not int32 / not starting at 0 / not ending at ``T`` /
            decreasing, ``max_seqlen`` below the longest sequence, negative or non-finite
            ``softcap``, unknown ``backend``.
        RuntimeError: ``backend="triton"`` on CPU without the Triton interpreter, or without triton.

    Validation reads ``cu_seqlens`` on the host (one small device-to-host copy per call).
    """
    max_seqlen = _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    softcap = _check_softcap(softcap)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    softmax_scale = float(softmax_scale)
    if resolve_backend(backend, (q, k, v)) == "torch":
        return flash_attn_varlen_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap=softcap)
    cu_seqlens = cu_seqlens.to(q.device, non_blocking=True)
    return FlashAttnVarlenFunction.apply(q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap)
