"""The int8 export's rounding, in torch: the one definition of the scheme's numbers.

The graph (:func:`~.quantize.rowwise_int8_matmuls`) multiplies

* **activations** rounded to symmetric int8 with one scale per token (row): step ``max|x| / 127``,
  round half to even (``QuantizeLinear``);
* **weights** rounded to nearest on a symmetric grid with one scale per output channel: step
  ``max|w| / levels``, ``levels`` 63 (7-bit) or 127 (8-bit) by CPU (:mod:`.cpu_int8`).

Everything that rounds like the graph uses these functions: the integers the graph stores
(:func:`~.quantize.quantize_columns`), the torch simulation calibration measures
(:class:`~.calibrate.Int8Simulator`), GPTQ's grid (:mod:`.gptq`) and quantization-aware training
(:mod:`llm2vec_fast.train.quantization_aware`). Torch only (no onnx), so training can import it.
"""

from __future__ import annotations

import torch

ROW_ACTIVATION_LEVELS = 127  # symmetric int8 activations, stored as uint8 with zero point 128
INT8_WEIGHT_LEVELS = 63  # symmetric 7-bit weights: no vpmaddubsw saturation on AVX2


def fake_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of ``x`` with one scale per row (token), as the graph
    rounds a MatMul's input."""
    peak = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return torch.round(x * (ROW_ACTIVATION_LEVELS / peak)) * (peak / ROW_ACTIVATION_LEVELS)


def _scales64(weight: torch.Tensor, levels: int) -> torch.Tensor:
    scale = weight.detach().double().abs().amax(dim=1) / levels
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def symmetric_scales(weight: torch.Tensor, levels: int) -> torch.Tensor:
    """One scale per output row of ``weight`` ``[out, in]``: ``max|w| / levels`` as float32 (1 for a
    zero row): the step of the grid the graph stores."""
    return _scales64(weight, levels).float()


def round_to_levels(weight: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest integers of ``weight`` ``[out, in]`` on its per-row grid: int8 ``q``
    ``[out, in]`` in ``[-levels, levels]`` and float32 ``scale`` ``[out]``, ``weight ~= q * scale``.
    The quotient is taken in float64 (the scale before its float32 cast), so the integers do not
    depend on the weight's dtype or device."""
    scale = _scales64(weight, levels)
    q = weight.detach().to(torch.float64, copy=True).div_(scale[:, None]).round_().clamp_(-levels, levels)
    return q.to(torch.int8), scale.float()


def fake_int8_weight(weight: torch.Tensor, levels: int) -> torch.Tensor:
    """The ``[out, in]`` weight the graph multiplies with, in ``weight``'s dtype and device: the
    integers of :func:`round_to_levels` times their float32 scale (no gradient)."""
    q, scale = round_to_levels(weight, levels)
    return (q.float() * scale[:, None]).to(weight.dtype)


def fake_int8_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of ``x`` with one scale per token and group of ``group``
    consecutive channels (OpenVINO's run-time activation quantization, ``openvino_runtime``); one
    scale per token where the channels do not split into whole groups."""
    k = x.shape[-1]
    if k % group:
        return fake_int8_rows(x)
    return fake_int8_rows(x.reshape(*x.shape[:-1], k // group, group)).reshape(x.shape)
