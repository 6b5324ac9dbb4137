"""ONNX export and ONNX Runtime encoder (``pip install llm2vec-fast[onnx]``).

``export_onnx(encoder, folder, precision)`` writes a self-contained folder; ``OnnxEncoder`` loads
it with the same ``encode()`` API as :class:`~llm2vec_fast.LLM2Vec`.
"""

from .exporter import ExportValidationError, Int8Options, ValidationConfig, export_onnx
from .onnx_encoder import OnnxEncoder, OpenVINOFp32Warning
from .precisions import PRECISIONS, THRESHOLDS
from .wrapper import NotExportableError

__all__ = [
    "export_onnx",
    "Int8Options",
    "OnnxEncoder",
    "OpenVINOFp32Warning",
    "PRECISIONS",
    "THRESHOLDS",
    "ExportValidationError",
    "ValidationConfig",
    "NotExportableError",
]
