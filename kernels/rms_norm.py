"""RMSNorm and fused residual-add + RMSNorm: public entry point, custom op and autograd.

``rms_norm(x, weight, eps)`` normalises the last dim of ``x``; with ``residual=`` it first forms
``residual + x`` (the decoder layer's residual add) and returns ``(normed, residual + x)`` from one
kernel launch: the sum is read and written once instead of an add kernel and a norm kernel each
reading it. Semantics (the casts of the Hugging Face models) are defined by
:mod:`.rms_norm_reference`, the ground truth and CPU path.

Backend rule as for attention and pooling: ``"auto"`` runs the Triton kernel (:mod:`.rms_norm_triton`)
on CUDA tensors and the reference otherwise; ``"triton"`` forces the kernel (CPU only under
``TRITON_INTERPRET=1``); ``"torch"`` forces the reference. The kernel takes rows of at most 16384
columns (``auto`` takes the reference for wider ones) and the dtype mixes of the reference: a weight
in another dtype than ``x``, and a float32 residual stream (``residual`` float32 under a 16-bit ``x``,
normalised rows written in ``out_dtype``), as flash-attention's ``residual_in_fp32``.

Runs as ``torch.ops.llm2vec_fast.rms_norm_fwd`` with a fake implementation, so ``torch.compile``
traces it without a graph break. The backward recomputes the reference in torch (the encode path
needs none; training does not use this op yet).
"""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .rms_norm_reference import add_rms_norm_reference, check_casting_mode, rms_norm_reference

__all__ = ["rms_norm"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ops():
    from . import rms_norm_triton  # lazy: triton is optional

    return rms_norm_triton


@torch.library.custom_op("llm2vec_fast::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    casting: str,
    offset: float,
    out_dtype: torch.dtype | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed [N, D], residual + x [N, D])`` for 2-D ``x``; the second output is empty ``[0]``
    without ``residual``."""
    if backend == "triton":
        x = x if x.stride(-1) == 1 else x.contiguous()
        residual = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
        out = normed_dtype(x, residual, weight, casting, out_dtype)
        y, total = _triton_ops().rms_norm_forward(x, residual, weight.contiguous(), eps, casting == "gemma", offset, out)
    elif residual is not None:
        y, total = add_rms_norm_reference(x, residual, weight, eps, casting, offset, out_dtype)
    else:
        y, total = rms_norm_reference(x, weight, eps, casting, offset, out_dtype), None
    return y, (total if total is not None else x.new_empty((0,)))


def normed_dtype(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, casting: str, out_dtype: torch.dtype | None = None
) -> torch.dtype:
    """The dtype of the normalised rows: ``out_dtype`` if given, else the norm input's (``x``, or the
    residual sum, whose dtype is ``residual``'s); ``"llama"`` multiplies the weight by the cast-back
    rows, so a weight in another dtype (fp32 norms under bf16 activations, bf16 norms over a float32
    residual stream) promotes it, as in the Hugging Face models."""
    if out_dtype is not None:
        return out_dtype
    norm_input = x if residual is None else residual
    return norm_input.dtype if casting == "gemma" else torch.promote_types(norm_input.dtype, weight.dtype)


@_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps, casting, offset, out_dtype, backend):
    normed = x.new_empty(x.shape, dtype=normed_dtype(x, residual, weight, casting, out_dtype))
    return normed, (torch.empty_like(residual) if residual is not None else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, residual, weight, eps, casting, offset, out_dtype, backend = inputs
    ctx.save_for_backward(x, residual, weight)
    ctx.args = (eps, casting, offset, out_dtype)


def _backward(ctx, grad_y, grad_total):
    x, residual, weight = ctx.saved_tensors
    eps, casting, offset, out_dtype = ctx.args
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (x, residual, weight) if t is not None]
        if residual is None:
            outputs, grads = [rms_norm_reference(inputs[0], inputs[1], eps, casting, offset, out_dtype)], [grad_y]
        else:
            outputs, grads = list(add_rms_norm_reference(*inputs, eps, casting, offset, out_dtype)), [grad_y, grad_total]
        found = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    if residual is None:
        return found[0], None, found[1], None, None, None, None, None
    return found[0], found[1], found[2], None, None, None, None, None


_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def row_kernel_backend(backend: str, resolved: str, width: int, what: str) -> str:
    """The Triton row kernels (RMSNorm, FP8) hold a row of up to ``MAX_BLOCK_D`` columns in registers:
    a wider row takes the reference under ``"auto"`` and is refused under ``"triton"``."""
    if resolved != "triton":
        return resolved
    from .rms_norm_triton import MAX_BLOCK_D

    if width <= MAX_BLOCK_D:
        return resolved
    if backend == "triton":
        raise ValueError(f"the Triton {what} holds rows of up to {MAX_BLOCK_D} columns, got {width}")
    return "torch"


def check_norm_arguments(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    casting: str,
    offset: float,
    backend: str,
    out_dtype: torch.dtype | None = None,
) -> str:
    """Validate the arguments of :func:`rms_norm` (and of the norm-then-quantize op); returns the
    backend to run: ``"triton"`` or ``"torch"``."""
    check_casting_mode(casting)
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("x and weight must be torch.Tensors")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; expected one of {_FLOAT_DTYPES}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x {tuple(x.shape)} needs a non-empty last dimension to normalise")
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype not in (x.dtype, torch.float32)):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must have x's shape {tuple(x.shape)} and x's dtype {x.dtype} "
            "(or float32: a float32 residual stream)"
        )
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported; expected None or one of {_FLOAT_DTYPES}")
    if casting != "gemma" and offset != 0.0:
        raise ValueError('offset applies to the "gemma" casting mode only')
    tensors = (x, weight) if residual is None else (x, residual, weight)
    resolved = row_kernel_backend(backend, resolve_backend(backend, tensors), x.shape[-1], "RMSNorm")
    if resolved == "triton" and weight.dtype not in _FLOAT_DTYPES:
        if backend == "triton":
            raise ValueError(f"the Triton RMSNorm takes weights in {_FLOAT_DTYPES}, got dtype {weight.dtype}")
        resolved = "torch"
    return resolved


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    casting: str = "llama",
    offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` ``[..., D]`` with ``weight`` ``[D]``.

    Args:
        x: fp16/bf16/fp32 activations.
        weight: the norm's weight ``[D]``.
        eps: added to the mean square.
        residual: optional, ``x``'s shape, in ``x``'s dtype or float32 (a float32 residual stream
            under 16-bit branch outputs): normalise ``residual + x`` and return the sum too (the new
            residual stream, in ``residual``'s dtype).
        casting: ``"llama"`` (Llama, Mistral, Qwen2, Qwen3) or ``"gemma"`` (see :mod:`.rms_norm_reference`).
        offset: added to the weight (``"gemma"`` only: Gemma's ``1 + w``).
        out_dtype: the normalised rows' dtype (``None``: the norm's own, below); under a float32
            residual stream, the 16-bit dtype the next GEMMs read.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).

    Returns:
        the normalised tensor in ``x``'s shape, or ``(normalised, residual + x)`` with ``residual``.
        Its dtype is ``out_dtype``, else the norm input's (``x``, or the sum), except that ``"llama"``
        with a weight in another dtype promotes it (``weight * normed.to(input dtype)``, as Hugging
        Face does); the sum is in ``residual``'s dtype. Differentiable.

    Raises:
        ValueError: bad shapes, dtypes, casting mode or backend.
    """
    resolved = check_norm_arguments(x, weight, residual, casting, offset, backend, out_dtype)
    shape = x.shape
    flat_residual = residual.reshape(-1, shape[-1]) if residual is not None else None
    y, total = torch.ops.llm2vec_fast.rms_norm_fwd(
        x.reshape(-1, shape[-1]), flat_residual, weight, float(eps), casting, float(offset), out_dtype, resolved
    )
    if residual is None:
        return y.reshape(shape)
    return y.reshape(shape), total.reshape(shape)
