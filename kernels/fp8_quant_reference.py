"""Row-wise FP8 quantization in torch: the ground truth of :mod:`.fp8_quant_triton` and its CPU path.

Scheme (``float8_e4m3fn``, symmetric, one scale per row): ``scale = amax(|row|) / 448`` in float32
(an all-zero row gets the smallest normal float32, so it quantizes to zeros), then
``clamp(x / scale, -448, 448)`` cast to e4m3 with round-to-nearest-even. The clamp matters: the cast
turns out-of-range values into NaN, and ``x / scale`` can land a rounding step above 448.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
#: the scale of an all-zero row (any positive value quantizes it to zeros)
MIN_SCALE = torch.finfo(torch.float32).tiny


def rowwise_scales(x: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row of ``x`` ``[rows, cols]``: ``amax(|row|) / 448`` (shape ``[rows, 1]``)."""
    return (x.detach().abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)


def fp8_quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: ``x`` ``[rows, cols]`` as ``float8_e4m3fn`` ``[rows, cols]`` with float32
    ``scales`` ``[rows, 1]``, ``x ~= q * scales``."""
    scales = rowwise_scales(x)
    return (x.detach().float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales
