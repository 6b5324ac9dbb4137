"""Calibration for int8: choose, decoder layer by decoder layer, where int8 runs.

The int8 product (``quantize.rowwise_int8_matmuls``: int8 activations with one scale per token,
7-bit per-column weights, ``MatMulIntegerToFloat``) is harmless in some layers and ruinous in others.
In the untrained bidirectional SmolLM2, layer 11 turns many tokens into values in the thousands
with a gain that ~1 % upstream error moves by 25-35 %, and the last layers partly cancel those
values again: int8 on layer 0 *alone* drops the worst sentence to cos 0.35, while int8 on any one
of layers 12-26 keeps it above 0.998. How much error a MatMul makes locally says nothing about
this, so the embeddings are measured, with the machinery of :mod:`llm2vec_fast.layer_sensitivity`
(shared with FP8 encoding): per-layer sensitivity simulated in torch (:class:`Int8Simulator`: the same
per-token activation and per-column weight rounding as the graph), then the longest least-sensitive
prefix that keeps the thresholds (:func:`select_int8_layers`), confirmed with ONNX Runtime on the
real graph (a prefix the graph misses is shortened until it passes).

The calibration thresholds are stricter than the validation thresholds because the minimum over
a hundred calibration inputs underestimates the tail on new text. Calibration inputs: STS-B train
(:func:`~llm2vec_fast.layer_sensitivity.calibration_inputs`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..layer_sensitivity import (  # noqa: F401  (calibration_inputs, cosine_rows, SENSITIVITY_INPUTS: used by the exporter and tests)
    SENSITIVITY_INPUTS,
    QuantSimulator,
    calibration_inputs,
    cosine_rows,
    select_quantized_layers,
)
from ..layer_sensitivity import decoder_layer_linears as shared_layer_linears


def onnx_matmul_name(module_name: str) -> str:
    """The TorchScript exporter's MatMul node name for decoder submodule ``module_name``
    (``layers.3.mlp.down_proj`` -> ``/decoder/layers.3/mlp/down_proj/MatMul``)."""
    path = re.sub(r"(^|/)layers/(\d+)", r"\1layers.\2", module_name.replace(".", "/"))
    return f"/decoder/{path}/MatMul"


def decoder_layer_linears(encoder) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, its ``nn.Linear`` modules keyed by their ONNX MatMul node name."""
    return shared_layer_linears(encoder, onnx_matmul_name)


def _fake_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize with one scale per row (token), as
    :func:`~.quantize.rowwise_int8_matmuls` does in the graph."""
    from .quantize import ROW_ACTIVATION_LEVELS

    peak = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return torch.round(x * (ROW_ACTIVATION_LEVELS / peak)) * (peak / ROW_ACTIVATION_LEVELS)


def _fake_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` rounded as :func:`~.quantize.quantize_columns` rounds the graph's
    ``[in, out]`` MatMul weight (one symmetric 7-bit scale per output)."""
    from .quantize import quantize_columns

    q, scale = quantize_columns(weight.detach().float().cpu().numpy().T)
    return torch.from_numpy((q.astype(np.float32) * scale).T.copy()).to(weight.device, weight.dtype)


class Int8Simulator(QuantSimulator):
    """The int8 scheme simulated in torch on chosen decoder MatMuls (named as in the ONNX graph) of
    ``encoder``: int8-rounded weights swapped in (rounded once, cached), inputs rounded per token by a
    pre-hook; everything is restored after each use."""

    def __init__(self, encoder, batch_size: int = 32):
        super().__init__(encoder, _fake_int8_rows, _fake_int8_weight, layers=decoder_layer_linears(encoder), batch_size=batch_size)


def select_int8_layers(
    layers: Sequence[Sequence[str]],
    sensitivity: Sequence[tuple[float, float]],
    embed: Callable[[set[str]], np.ndarray],
    reference: np.ndarray,
    confirm: Callable[[set[str]], np.ndarray] | None = None,
    min_cos: float = 0.99,
    mean_cos: float = 0.997,
    progress: Callable[[str], None] | None = None,
) -> tuple[set[str], dict]:
    """MatMul node names to run in int8, and a summary for the export report
    (:func:`~llm2vec_fast.layer_sensitivity.select_quantized_layers` with int8 / fp32 labels; the
    search runs in torch, ``confirm`` on ONNX Runtime)."""
    return select_quantized_layers(
        layers,
        sensitivity,
        embed,
        reference,
        confirm=confirm,
        min_cos=min_cos,
        mean_cos=mean_cos,
        progress=progress,
        low="int8",
        high="fp32",
    )
