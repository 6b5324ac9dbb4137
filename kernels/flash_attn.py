"""Packed (varlen) bidirectional attention: public entry point and autograd Function.

LLM2Vec turns a causal decoder into an encoder by letting every token attend to every token of its
own sequence. With packed batches (no padding) that is block-diagonal attention over
``[T, H, D]`` tensors, the layout of flash-attention's ``flash_attn_varlen_func``:

    sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of ``q``, ``k`` and ``v``, and each of
    those rows attends to all rows of the same sequence (not causal), nothing else.

Layering (like Liger-Kernel): the Triton kernels and their launchers live in
:mod:`.flash_attn_triton`, the pure-torch references in :mod:`.flash_attn_reference`; this file
validates inputs, picks the backend and registers both backends' forward/backward as
``torch.library`` custom ops with autograd (``torch.ops.llm2vec_fast.flash_attn_varlen_fwd/_bwd``).
"""

from __future__ import annotations

import math
import operator

import torch

from ._dispatch import check_cu_seqlens, check_cu_seqlens_layout, max_length, resolve_backend, should_validate
from .flash_attn_reference import flash_attn_varlen_reference, flash_attn_varlen_reference_backward

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ops():
    from . import flash_attn_triton  # lazy: triton is optional and only needed here

    return flash_attn_triton


# ---------------------------------------------------------------------------------------------
# custom ops: the autograd layer (Liger's middle layer), opaque to torch.compile
# ---------------------------------------------------------------------------------------------
# Both backends run inside ``torch.library.custom_op``s with fake (meta) implementations, as
# flash-attention's ``flash_attn_interface`` does: ``torch.compile(fullgraph=True)`` traces a call as
# one node (the reference's per-sequence loop reads ``cu_seqlens`` on the host, which would otherwise
# break the graph). ``backend`` is already resolved to "triton" or "torch". ``philox`` is the dropout
# state ``int64 [2]`` = (seed, offset) on the CPU (None without dropout): a tensor, so a compiled graph
# takes a fresh draw each call instead of baking one in as a constant.


def _philox_ints(philox: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if philox is None else tuple(int(x) for x in philox.tolist())  # a CPU tensor: no sync


def _reference_dropout_generator(device: torch.device, dropout_p: float, philox: torch.Tensor | None):
    """The torch backend's mask source: a generator seeded from the call's (seed, offset), so the
    backward redraws the forward's masks (the reference stores none either)."""
    if dropout_p <= 0.0:
        return None
    seed, offset = _philox_ints(philox)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (1 << 63))
    return gen


@torch.library.custom_op("llm2vec_fast::flash_attn_varlen_fwd", mutates_args=())
def _varlen_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    softcap: float,
    dropout_p: float,
    philox: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, Hq, D], lse)``; ``lse`` is the kernel's fp32 ``[Hq, T]`` log-sum-exp on the Triton
    backend and an empty ``[Hq, 0]`` on the torch backend (its backward recomputes instead)."""
    if backend == "triton":
        seed, offset = _philox_ints(philox)
        return _triton_ops().attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap, (dropout_p, seed, offset))
    gen = _reference_dropout_generator(q.device, dropout_p, philox)
    out = flash_attn_varlen_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, softcap=softcap, dropout_generator=gen)
    return out.contiguous(), q.new_empty((q.shape[1], 0), dtype=torch.float32)


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap, dropout_p, philox, backend):
    n_lse = q.shape[0] if backend == "triton" else 0
    return q.new_empty(q.shape), q.new_empty((q.shape[1], n_lse), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::flash_attn_varlen_bwd", mutates_args=())
def _varlen_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    softcap: float,
    dropout_p: float,
    philox: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``: the Triton backward kernels (FlashAttention-2 recomputation from ``lse``), or on
    the torch backend the reference's backward written out, under the same dropout masks."""
    if backend == "triton":
        seed, offset = _philox_ints(philox)
        return _triton_ops().attention_backward(
            grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, softcap, (dropout_p, seed, offset)
        )
    gen = _reference_dropout_generator(q.device, dropout_p, philox)
    return flash_attn_varlen_reference_backward(
        grad_out, q, k, v, cu_seqlens, softmax_scale, dropout_p, softcap=softcap, dropout_generator=gen
    )


@_varlen_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, softcap, dropout_p, philox, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap, dropout_p, philox, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, philox)  # the dropout mask is never stored
    ctx.args = (max_seqlen, softmax_scale, softcap, dropout_p, backend)


def _varlen_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, philox = ctx.saved_tensors
    max_seqlen, softmax_scale, softcap, dropout_p, backend = ctx.args
    dq, dk, dv = _varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, softcap, dropout_p, philox, backend)
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, validate: bool | None) -> int:
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
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    check_cu_seqlens_layout(cu_seqlens)
    if should_validate(validate, cu_seqlens):
        longest = max_length(check_cu_seqlens(cu_seqlens, n_tokens))
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


def _check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # also rejects NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return dropout_p


# Philox seeds and offsets are kept in [2**32, 2**62): always 64-bit kernel arguments, so a new draw
# never changes the argument types (and never triggers a recompile).
_PHILOX_LOW, _PHILOX_SPAN = 1 << 32, (1 << 62) - (1 << 32)


def dropout_philox_state(q: torch.Tensor, max_seqlen: int) -> tuple[int, int]:
    """Draw the ``(seed, offset)`` that a :func:`flash_attn_varlen` call with dropout on ``q`` uses.

    The state comes from torch's default generator for ``q``'s device, so ``torch.manual_seed(s)``
    makes runs reproducible and consecutive calls get different masks. On CUDA it is the
    generator's Philox seed and offset (the offset is advanced past the ``Hq * T * max_seqlen``
    counters the kernel uses, as torch's own dropout does; no device sync); on other devices two
    integers are drawn from the CPU generator. Calling this advances the generator exactly as one
    dropout call does -- tests use it to rebuild a call's mask with :func:`flash_attn_dropout_mask`.
    """
    n_counters = q.shape[0] * q.shape[1] * max(int(max_seqlen), 1)
    if q.is_cuda:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        seed, offset = gen.initial_seed(), gen.get_offset()
        gen.set_offset(offset + (n_counters + 3) // 4 * 4)  # torch keeps CUDA offsets multiples of 4
    else:
        seed, offset = torch.randint(0, _PHILOX_SPAN, (2,), dtype=torch.int64).tolist()
    return _PHILOX_LOW + seed % _PHILOX_SPAN, _PHILOX_LOW + offset % _PHILOX_SPAN


def _philox_tensor(q: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """:func:`dropout_philox_state` as an int64 ``[2]`` CPU tensor for the custom op. Under
    ``torch.compile`` the pair is drawn with ``torch.randint`` inside the graph, so every run of the
    compiled code takes a fresh draw from torch's generator (reproducible under ``torch.manual_seed``;
    other bits than eager)."""
    if torch.compiler.is_compiling():
        return torch.randint(0, _PHILOX_SPAN, (2,), dtype=torch.int64) + _PHILOX_LOW
    return torch.tensor(dropout_philox_state(q, max_seqlen), dtype=torch.int64)


def flash_attn_dropout_mask(
    cu_seqlens: torch.Tensor, n_heads: int, max_seqlen: int, dropout_p: float, seed: int, offset: int
) -> torch.Tensor:
    """The keep-mask the Triton kernels use for ``(dropout_p, seed, offset)``, for tests.

    Returns bool ``[n_heads, T, max_seqlen]`` on ``cu_seqlens``' device: ``mask[h, t, j]`` is True
    when the probability of query row ``t`` (q head ``h``) on key ``j`` of its own sequence is kept;
    columns past the sequence's length are False. Feed it to
    :func:`flash_attn_varlen_reference` (``dropout_mask=``) to reproduce a dropout call exactly.
    Needs Triton (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).
    """
    dropout_p = _check_dropout_p(dropout_p)
    bounds = check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]))
    if int(max_seqlen) < max_length(bounds):
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({max_length(bounds)})")
    resolve_backend("triton", (cu_seqlens,))
    return _triton_ops().dropout_keep_mask(cu_seqlens, int(n_heads), int(max_seqlen), dropout_p, seed, offset)


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    softcap: float = 0.0,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """Bidirectional attention over a packed batch of variable-length sequences.

    Args:
        q: ``[T, Hq, D]`` queries, all sequences concatenated along ``T`` without padding.
        k: ``[T, Hkv, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention:
            q head ``h`` reads kv head ``h // (Hq // Hkv)``).
        v: ``[T, Hkv, D]`` values.
        cu_seqlens: int32 ``[B+1]`` offsets: 0, then cumulative sequence lengths, ending at ``T``.
            Lengths may be any size >= 0 (1 included). Copied to ``q``'s device if needed. Its values
            are only read when validating (see ``validate``).
        max_seqlen: an upper bound on the sequence lengths (sizes the kernel grid); may exceed the
            longest sequence, must not be smaller.
        softmax_scale: scale of ``q @ k^T`` before the softmax; default ``1 / sqrt(D)``.
        dropout_p: attention dropout on the probabilities, as in
            ``F.scaled_dot_product_attention(dropout_p=...)`` and FlashAttention-2: each probability
            is dropped with probability ``dropout_p`` and the kept ones are scaled by
            ``1 / (1 - dropout_p)``. Applied whenever ``> 0`` (pass 0 in eval). The Triton kernels draw
            the mask with Philox from a ``(seed, offset)`` taken from torch's generator for ``q``'s
            device (:func:`dropout_philox_state`): ``torch.manual_seed`` makes it reproducible, each
            call gets a new mask, and the backward regenerates the same mask (no mask is stored).
            The torch backend draws its masks with ``torch.rand`` from a generator seeded with the
            same ``(seed, offset)`` (same distribution, other bits).
        softcap: tanh soft-capping of the attention logits (Gemma2's ``attn_logit_softcapping``,
            FlashAttention's ``softcap``): the logits become
            ``softcap * tanh(q @ k^T * softmax_scale / softcap)`` -- scaled first, then capped, as in
            transformers' Gemma2 eager attention. ``0`` (or ``None``) disables capping. The backward
            applies the ``1 - tanh^2`` derivative.
        backend: ``"auto"`` (Triton on CUDA tensors, the torch reference on CPU), ``"triton"``
            (force the kernels; on CPU only under ``TRITON_INTERPRET=1``, for tests) or ``"torch"``
            (force the reference: one ``scaled_dot_product_attention`` call per sequence).
        validate: read ``cu_seqlens`` on the host and check its values (starts at 0, non-decreasing,
            ends at ``T``, no sequence longer than ``max_seqlen``). ``None`` (default): only when that
            is free, i.e. ``cu_seqlens`` is a CPU tensor and the call is not being compiled; ``True``
            always (one device-to-host copy for a GPU tensor); ``False`` never. Shapes, dtypes and
            devices are always checked (no copy).

    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype. Differentiable with respect to ``q``, ``k`` and ``v``.

    Supported: D in {32, 64, 80, 96, 128, 256}; fp16 and bf16 (fp32 works too, with IEEE-precision
    dots, mainly for testing). Softmax statistics and accumulators are fp32.

    Raises:
        ValueError: wrong ranks or shapes, ``Hq % Hkv != 0``, unsupported head dim or dtype, mixed
            dtypes/devices, ``cu_seqlens`` not int32 / not starting at 0 / not ending at ``T`` /
            decreasing, ``max_seqlen`` below the longest sequence, negative or non-finite
            ``softcap``, ``dropout_p`` outside ``[0, 1)``, unknown ``backend``.
        RuntimeError: ``backend="triton"`` on CPU without the Triton interpreter, or without triton.

    Sync-free contract: with a GPU ``cu_seqlens`` and ``validate`` left at ``None`` nothing here
    copies device memory to the host, so a packed forward issues its kernels for every layer
    without waiting for the GPU; ``max_seqlen`` (a Python int) sizes the grid. Batches built by
    :func:`llm2vec_fast.packing.pack` are validated once, on the host, when they are built. The op
    is ``torch.ops.llm2vec_fast.flash_attn_varlen_fwd`` (backward ``..._bwd``), a
    ``torch.library.custom_op`` with a fake implementation: ``torch.compile(fullgraph=True)``
    traces a call without a graph break, on both backends. Under compile the dropout state is
    drawn inside the graph (``torch.randint``), so each run gets a new mask and
    ``torch.manual_seed`` still makes runs reproducible.
    """
    max_seqlen = _check_inputs(q, k, v, cu_seqlens, max_seqlen, validate)
    softcap = _check_softcap(softcap)
    dropout_p = _check_dropout_p(dropout_p)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    softmax_scale = float(softmax_scale)
    backend = resolve_backend(backend, (q, k, v))
    if backend == "triton":
        cu_seqlens = cu_seqlens.to(q.device, non_blocking=True)
    philox = _philox_tensor(q, max_seqlen) if dropout_p > 0.0 else None
    out, _ = torch.ops.llm2vec_fast.flash_attn_varlen_fwd(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, softcap, dropout_p, philox, backend
    )
    return out
