"""GPTQ rounding of the int8 export's weights: each ``nn.Linear``'s int8 levels chosen to keep its
*output* on calibration inputs, not each weight, as close to fp32 as the grid allows (the algorithm
and its sequential pass over a decoder: :mod:`llm2vec_fast.gptq`).

The grid is the export's: symmetric, one scale per output (``max|w| / levels``, as round-to-nearest,
:func:`~.quantize.quantize_columns`), integers in ``[-levels, levels]``; only which integer each
weight gets changes, and the graph stores exactly these integers. Block ``i`` is calibrated on the
outputs of blocks ``0..i-1`` already in int8, GPTQ weights and int8 activations rounded as the graph
does: per token for ``int8``, per token and channel group for ``int8-openvino``.

Maintained implementations were tried first: llmcompressor 0.14 pins ``transformers<=5.17`` (this
project runs 5.2x) and GPTQModel builds from source; neither rounds to the 63-level grid that AVX2
needs, nor hands back the integers for our own graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..gptq import BLOCK_COLUMNS, DEFAULT_DAMP, Grid, gptq_round, sequential_gptq
from .int8_rounding import fake_int8_rows, symmetric_scales

QuantizedWeight = tuple[np.ndarray, np.ndarray]  # graph layout: int8 q [in, out], float32 scale [out]


def integer_grid(levels: int) -> Grid:
    """The export's grid: integers in ``[-levels, levels]``, scale ``max|w| / levels`` per output."""
    if not 1 <= levels <= 127:
        raise ValueError(f"levels must be in 1..127, got {levels}")
    return Grid(scales=lambda w: symmetric_scales(w, levels), round=lambda x: torch.clamp(torch.round(x), -levels, levels))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    levels: int,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    block_columns: int = BLOCK_COLUMNS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-rounded integers of ``weight`` ``[out, in]`` on the symmetric per-row grid of ``levels``
    (largest magnitude: 63 for 7-bit, 127 for 8-bit): ``q`` int8 ``[out, in]`` and ``scale`` float32
    ``[out]`` with ``weight ~= q * scale[:, None]``. The other arguments: :func:`llm2vec_fast.gptq.gptq_round`."""
    grid = integer_grid(levels)
    values, scale = gptq_round(weight, hessian, grid, damp=damp, act_order=act_order, block_columns=block_columns)
    return values.to(torch.int8), scale


def to_graph_layout(q: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    """``[out, in]`` integers -> the ONNX MatMul's ``[in, out]`` int8 and its per-column scale."""
    return np.ascontiguousarray(q.cpu().numpy().T), scale.cpu().numpy().astype(np.float32)


def gptq_decoder_weights(
    encoder,
    inputs: Sequence,
    levels: int,
    act_order: bool = True,
    damp: float = DEFAULT_DAMP,
    batch_size: int = 32,
    sequential: bool = True,
    progress: Callable[[str], None] | None = None,
    activation_rounding: Callable[[torch.Tensor], torch.Tensor] = fake_int8_rows,
) -> dict[str, QuantizedWeight]:
    """GPTQ-rounded int8 weights of every decoder ``nn.Linear`` of ``encoder`` (an fp32 LLM2Vec),
    keyed by its ONNX MatMul name, calibrated sequentially on ``inputs`` (see the module docstring;
    ``sequential=False``: every Linear on the fp32 model's inputs, one pass). The encoder is
    unchanged afterwards. ``activation_rounding`` is how the graph rounds each Linear's input
    (default: per token, the int8 export's; int8-openvino passes OpenVINO's per-group rounding)."""
    from .calibrate import decoder_layer_linears

    return sequential_gptq(
        encoder,
        inputs,
        decoder_layer_linears(encoder),
        integer_grid(levels),
        activation_rounding,
        store=lambda values, scale: to_graph_layout(values.to(torch.int8), scale),
        act_order=act_order,
        damp=damp,
        batch_size=batch_size,
        sequential=sequential,
        progress=progress,
    )
