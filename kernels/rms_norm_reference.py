"""RMSNorm and fused residual-add + RMSNorm in pure torch: the ground truth of the Triton kernel and
its CPU path.

The arithmetic is the Hugging Face models' own, so a decoder whose norms run this reference gives the
same bits as the unmodified model:

* ``"llama"`` (Llama, Mistral, Qwen2, Qwen3 and their ``q_norm``/``k_norm``): the mean square and the
  scaling in float32, the result cast back to the input dtype, then multiplied by the weight;
* ``"gemma"``: everything in float32 with the weight shifted by ``offset`` (``1 + w``), cast at the end.

The residual add (``residual + x``) happens in the input dtype, as in the decoder layers, or in float32
when the residual stream is kept in float32 (``residual`` float32, ``x`` a 16-bit branch output: torch's
promotion); the norm then reads the float32 sum. ``out_dtype`` rounds the normalised rows once more,
to the dtype the next GEMMs read (16-bit under a float32 stream).
"""

from __future__ import annotations

import torch

CASTING_MODES = ("llama", "gemma")


def check_casting_mode(casting: str) -> None:
    if casting not in CASTING_MODES:
        raise ValueError(f"unknown RMSNorm casting mode {casting!r}; expected one of {CASTING_MODES}")


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    casting: str = "llama",
    offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim (``* (offset + weight)`` for ``"gemma"``), with the
    casts of ``casting``, then cast to ``out_dtype`` if given."""
    check_casting_mode(casting)
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        y = (normed * (offset + weight.float())).to(input_dtype)
    elif offset != 0.0:
        raise ValueError('offset applies to the "gemma" casting mode only')
    else:
        y = weight * normed.to(input_dtype)
    return y if out_dtype is None else y.to(out_dtype)


def add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    casting: str = "llama",
    offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``: the decoder layer's residual add and the next norm."""
    total = residual + x
    return rms_norm_reference(total, weight, eps, casting, offset, out_dtype), total
