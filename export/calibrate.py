"""Calibration for int8: choose, decoder layer by decoder layer, where int8 runs.

The int8 product (``quantize.rowwise_int8_matmuls``: int8 activations with one scale per token,
7-bit per-column weights, ``MatMulIntegerToFloat``) is harmless in some layers and ruinous in others.
In the untrained bidirectional SmolLM2, layer 11 turns many tokens into values in the thousands
with a gain that ~1 % upstream error moves by 25-35 %, and the last layers partly cancel those
values again: int8 on layer 0 *alone* drops the worst sentence to cos 0.35, while int8 on any one
of layers 12-26 keeps it above 0.998. How much error a MatMul makes locally says nothing about
this, so the embeddings are measured, with the machinery of :mod:`llm2vec_fast.layer_sensitivity`
(shared with FP8 encoding): per-layer sensitivity simulated in torch (:class:`Int8Simulator`: the same
per-token activation and per-column weight rounding as the graph, :mod:`.int8_rounding`), then the longest least-sensitive
prefix that keeps the thresholds (:func:`select_int8_layers`), confirmed with ONNX Runtime on the
real graph (a prefix the graph misses is shortened until it passes).

The weights the simulation and the graph use are the same integers: GPTQ-rounded
(:func:`~.gptq.gptq_decoder_weights`, calibrated on the same inputs) or rounded to nearest, 7- or
8-bit (:mod:`.cpu_int8`).

Thresholds: the worst calibration input must stay at least as close to fp32 as the same encoder in
bf16 on the same inputs, within [0.95, 0.98] (``precisions.int8_min_cos``; bf16 itself is not
within 0.98 of fp32 on every text), and the mean at 0.995 (validation asks 0.99: calibration
scores the texts it chose on). Calibration inputs: STS-B train
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
from .int8_rounding import INT8_WEIGHT_LEVELS, fake_int8_rows, round_to_levels


def onnx_matmul_name(module_name: str) -> str:
    """The TorchScript exporter's MatMul node name for decoder submodule ``module_name``
    (``layers.3.mlp.down_proj`` -> ``/decoder/layers.3/mlp/down_proj/MatMul``)."""
    path = re.sub(r"(^|/)layers/(\d+)", r"\1layers.\2", module_name.replace(".", "/"))
    return f"/decoder/{path}/MatMul"


def decoder_layer_linears(encoder) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, its ``nn.Linear`` modules keyed by their ONNX MatMul node name."""
    return shared_layer_linears(encoder, onnx_matmul_name)


def _dequantized(quantized: tuple[np.ndarray, np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` weight the graph multiplies with: its ``[in, out]`` int8 ``q`` times the
    per-column ``scale``."""
    q, scale = quantized
    return torch.from_numpy((q.astype(np.float32) * scale).T.copy()).to(like.device, like.dtype)


class Int8Simulator(QuantSimulator):
    """The int8 scheme simulated in torch on chosen decoder MatMuls (named as in the ONNX graph) of
    ``encoder``: int8-rounded weights swapped in (rounded once, cached), inputs rounded per token by a
    pre-hook; everything is restored after each use.

    ``weights`` (graph layout, as :func:`~.quantize.rowwise_int8_matmuls` takes them: MatMul name
    -> int8 ``[in, out]`` and scale ``[out]``, e.g. from :func:`~.gptq.gptq_decoder_weights`) are
    used where given; other MatMuls are rounded to nearest with ``weight_levels``.
    ``fake_activation``: how the graph rounds a MatMul's input (per token for ``int8``;
    int8-openvino passes OpenVINO's per-group rounding)."""

    def __init__(
        self,
        encoder,
        batch_size: int = 32,
        weight_levels: int | None = None,
        weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        fake_activation: Callable[[torch.Tensor], torch.Tensor] = fake_int8_rows,
    ):
        super().__init__(encoder, fake_activation, None, layers=decoder_layer_linears(encoder), batch_size=batch_size)
        self.weight_levels = INT8_WEIGHT_LEVELS if weight_levels is None else weight_levels
        self.weights = dict(weights or {})

    def quantized(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """MatMul ``name``'s int8 weight and scale in graph layout (given, or rounded to nearest)."""
        from .gptq import to_graph_layout

        if name not in self.weights:  # the integers of quantize.quantize_columns, without going through numpy
            self.weights[name] = to_graph_layout(*round_to_levels(self.modules[name].weight.detach().float().cpu(), self.weight_levels))
        return self.weights[name]

    def _rounded_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self._rounded:
            self._rounded[name] = _dequantized(self.quantized(name), weight)
        return self._rounded[name]


class Fp32AccumulatedBf16Linear(nn.Linear):
    """A bf16 ``nn.Linear`` computed as a bf16 GEMM computes it (bf16 inputs and weights, products
    summed in fp32, the result rounded to bf16) through an fp32 GEMM. On a CPU without bf16
    instructions torch's own bf16 GEMM took 8x the time of fp32 (the export's bf16 bar, 54 s of
    128 instruction pairs on an AVX2-only Zen 3; this: 7 s). The outputs differ by one bf16 ulp on
    1 element in 10,000 (summation order); the embeddings agree with torch's bf16 to 1e-4 in
    cosine except on knife-edge inputs (``benchmarks/int8_perturbation.py``), where either can land
    on either side (docs/export.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def bf16_copy(encoder, fp32_accumulated_linears: bool | None = None):
    """A bfloat16 copy of ``encoder`` (the int8 fidelity bar is relative to bf16's, see
    ``precisions.int8_min_cos``); the encoder itself is untouched.

    ``fp32_accumulated_linears``: run its linear layers as :class:`Fp32AccumulatedBf16Linear`
    (the same arithmetic at fp32 speed). ``None``: where torch's bf16 GEMMs would be slow (a CPU encoder on
    a CPU without bf16 instructions, ``cpu_int8.has_bf16_gemm``); timing torch's own bf16 asks
    ``False``."""
    import copy

    from ..encoding import CONFIG_KEYS
    from .cpu_int8 import has_bf16_gemm

    model = copy.deepcopy(encoder.model).to(torch.bfloat16)
    if fp32_accumulated_linears is None:
        on_cpu = next(model.parameters()).device.type == "cpu"
        fp32_accumulated_linears = on_cpu and not has_bf16_gemm()
    if fp32_accumulated_linears:
        for module in model.modules():
            if type(module) is nn.Linear:  # not subclasses with their own forward
                module.__class__ = Fp32AccumulatedBf16Linear
    return type(encoder)(
        model,
        encoder.tokenizer,
        model_id=encoder.model_id,
        packed=encoder.packed,
        **{k: getattr(encoder, k) for k in CONFIG_KEYS},
    )


def bf16_embeddings(encoder, inputs: Sequence, batch_size: int = 32) -> np.ndarray:
    """Embeddings of ``inputs`` by :func:`bf16_copy` of ``encoder``."""
    return np.asarray(bf16_copy(encoder).encode(list(inputs), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True))


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
