"""OpenVINO as a second runtime for an exported folder (``pip install llm2vec-fast[openvino]``).

OpenVINO's ONNX frontend reads the exported graphs as they are, the ONNX Runtime contrib ops of
the int8 and int4 exports included (``MatMulIntegerToFloat``, ``MatMulNBits``), and its CPU plugin
compiles them for this CPU. The ``int8-openvino`` export is made for it: int8 weights in the
decoder MatMuls (all but the most sensitive layer's by default), whose inputs OpenVINO quantizes at
run time per token and group of ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` channels.
:class:`OpenVINOSession` offers the part of an ``onnxruntime.InferenceSession`` that :class:`~.onnx_encoder.OnnxEncoder` uses, so
``OnnxEncoder.from_pretrained(folder, runtime="openvino")`` has the same ``encode()``.

Inference precision: OpenVINO's CPU plugin computes in bf16 by default on CPUs with bf16
instructions (AVX512-BF16, AMX), which is not an fp32 result; the default here is ``"f32"``
(the graph's own precision); ``"bf16"`` is the faster, less faithful choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PROVIDER_NAME = "OpenVINO:CPU"
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")
# MatMuls with int8 weights (the int8-openvino export) get their input quantized to int8 at run time
# with one scale per token and group of this many input channels, and run on int8 GEMMs. Always set
# (an export records the size it was validated with), never left to OpenVINO's version-dependent
# default. Measured on a 2-core AVX-512 VNNI EPYC, default encoder: group 64 runs 1.1-1.2x faster
# than 32 and 16 0.8x; 128 is no faster than 64. With GPTQ weights and the most sensitive layer in
# fp32 (the export's defaults), 64 held the held-out bar (benchmarks/results/onnx-cpu-trained.json).
DYNAMIC_QUANTIZATION_GROUP_SIZE = 64
ACTIVATION_GROUP_SIZES = (16, 32, 64, 128)
INSTALL_HINT = "pip install llm2vec-fast[openvino]"


def check_activation_group_size(size: int) -> int:
    """``size`` if it is one of ``ACTIVATION_GROUP_SIZES``, else a ValueError."""
    if isinstance(size, bool) or not isinstance(size, int) or size not in ACTIVATION_GROUP_SIZES:
        raise ValueError(f"OpenVINO activation group size must be one of {ACTIVATION_GROUP_SIZES}, got {size!r}")
    return size


def import_openvino():
    try:
        import openvino
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"runtime='openvino' needs OpenVINO: {INSTALL_HINT}") from err
    return openvino


class OpenVINOSession:
    """An exported ``model.onnx`` compiled by OpenVINO for the CPU: ``run(output_names, feeds)``
    and ``get_providers()`` as ONNX Runtime's session."""

    def __init__(
        self,
        model_file: str | Path,
        num_threads: int = 0,
        inference_precision: str = "f32",
        activation_group_size: int = DYNAMIC_QUANTIZATION_GROUP_SIZE,
    ):
        check_activation_group_size(activation_group_size)
        if inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"inference_precision must be one of {INFERENCE_PRECISIONS}, got {inference_precision!r}")
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {num_threads}")
        ov = import_openvino()
        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": inference_precision,
            "PERFORMANCE_HINT": "LATENCY",
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": activation_group_size,
        }
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.compiled = core.compile_model(core.read_model(str(model_file)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inference_precision = inference_precision
        self.activation_group_size = activation_group_size

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        ports = [self.compiled.output(name) for name in output_names] if output_names else list(self.compiled.outputs)
        return [np.array(results[port], copy=True) for port in ports]  # the request reuses its buffers

    def get_providers(self) -> list[str]:
        return [PROVIDER_NAME]
