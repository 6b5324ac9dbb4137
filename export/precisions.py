"""Export precisions and the fidelity each must keep against the torch fp32 encoder.

An export whose validation falls below its precision's thresholds fails (``ExportValidationError``,
report ``status: "failed"``). Cosines are between ONNX and torch embeddings of the same inputs;
the Spearman drop is in points (x100) on the STS-B dev pairs used for validation, and is only
checked when the torch encoder itself scores at least ``MIN_MEANINGFUL_SPEARMAN`` (a random
or untrained encoder's Spearman is noise).

int8's (and int8-openvino's) minimum cosine is relative to bf16: ``int8_min_cos(bf16 minimum cosine on the same
inputs)`` = ``max(0.95, min(0.98, bf16))``; the exporter measures a bf16 copy of the encoder on the
validation inputs and writes the bar it used into the report (``thresholds``, ``bf16``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PRECISIONS = ("fp32", "fp16", "int8", "int4", "int8-openvino")
INT8_PRECISIONS = ("int8", "int8-openvino")  # calibrated, SmoothQuant, bf16-relative worst-sentence bar
# the runtime a precision is made for (OnnxEncoder's default for the folder, and the one that validates it)
PRECISION_RUNTIME = {"int8-openvino": "openvino"}
MIN_MEANINGFUL_SPEARMAN = 20.0


@dataclass(frozen=True)
class Thresholds:
    min_cos: float
    mean_cos: float
    max_spearman_drop: float

    def as_dict(self) -> dict:
        return asdict(self)


# int8's worst-sentence bar follows bf16: at least as faithful as the same encoder in bf16 on the
# same texts, never required above 0.98, never allowed below 0.95 (bf16 is itself not within 0.98
# of fp32 on every text: it rounds every activation to 8 significant bits)
INT8_MIN_COS_FLOOR = 0.95
INT8_MIN_COS_CEILING = 0.98


INT8_THRESHOLDS = Thresholds(min_cos=INT8_MIN_COS_CEILING, mean_cos=0.99, max_spearman_drop=0.5)  # min_cos: see int8_min_cos

THRESHOLDS = {
    "fp32": Thresholds(min_cos=0.9999, mean_cos=0.99999, max_spearman_drop=0.1),
    "fp16": Thresholds(min_cos=0.99, mean_cos=0.998, max_spearman_drop=0.5),
    "int8": INT8_THRESHOLDS,
    "int4": Thresholds(min_cos=0.95, mean_cos=0.99, max_spearman_drop=2.0),
    "int8-openvino": INT8_THRESHOLDS,
}


def int8_min_cos(bf16_min_cos: float) -> float:
    """int8's minimum cosine to fp32, given bf16's minimum cosine to fp32 on the same texts."""
    return max(INT8_MIN_COS_FLOOR, min(INT8_MIN_COS_CEILING, float(bf16_min_cos)))


def precision_runtime(precision: str | None) -> str:
    """``"openvino"`` for a precision made for OpenVINO, else ``"onnxruntime"``."""
    return PRECISION_RUNTIME.get(precision, "onnxruntime")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return precision
