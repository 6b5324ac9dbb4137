"""RMSNorm and fused residual-add + RMSNorm in pure torch: the ground truth of the Triton kernel and
its CPU path.

The arithmetic is the Hugging Face models' own, so a decoder whose norms run this reference gives the
same bits as the unmodified model:

* ``"llama"`` (Llama, Mistral, Qwen2, Qwen3 and their ``q_norm``/``k_norm``): the mean square and the
  scaling in float32, the result cast back to the input dtype, then multiplied by the weight;
* ``"gemma"``: everything in float32 with the weight shifted by ``offset`` (``1 + w``), cast at the end.

The residual add (``residual + x``) happens in the input dtype, as in the decoder layers.
"""

from __future__ import annotations

import torch

CASTING_MODES = ("llama", "gemma")


def check_casting_mode(casting: str) -> None:
    if casting not in CASTING_MODES:
        raise ValueError(f"unknown RMSNorm casting mode {casting!r}; expected one of {CASTING_MODES}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, casting: str = "llama", offset: float = 0.0) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim (``* (offset + weight)`` for ``"gemma"``), with the
    casts of ``casting``."""
    check_casting_mode(casting)
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (normed * (offset + weight.float())).to(input_dtype)
    if offset != 0.0:
        raise ValueError('offset applies to the "gemma" casting mode only')
    return weight * normed.to(input_dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, casting: str = "llama", offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``: the decoder layer's residual add and the next norm."""
    total = residual + x
    return rms_norm_reference(total, weight, eps, casting, offset), total
