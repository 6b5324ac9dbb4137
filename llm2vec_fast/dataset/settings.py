"""The settings that decide a job's output: a rerun must match them to resume.

Encoder settings include a fingerprint of the weights (so a different checkpoint, adapter or
dtype is caught even from the same path); engine, rank count, device and batch size are left out,
so a job may resume with another engine or number of GPUs.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..bidirectional import is_bidirectional
from ..fused_layers import residual_dtype


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every parameter's and saved buffer's name, shape, dtype and float64 sum of
    absolute values (rounded, so the same weights give the same fingerprint on CPU and GPU).

    Saved buffers count because FP8 layers keep their weights as buffers; the ones a checkpoint does
    not save (rotary ``inv_freq``, derived from the config) do not, so an unquantized model's
    fingerprint, and the manifests that hold it, stay what they were."""
    h = hashlib.sha256()
    saved = model.state_dict(keep_vars=True).keys()
    buffers = [(name, b) for name, b in model.named_buffers() if name in saved]
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *buffers]:
            values = p.detach()
            if values.dtype.itemsize == 1 and values.is_floating_point():  # float8: no norm kernels
                values = values.float()
            # L1 norm accumulated in float64 without an abs() copy of each tensor: the same value as
            # abs().sum(dtype=float64), at about half the time (135M params: ~0.5 s on 2 CPU cores)
            total = float(torch.linalg.vector_norm(values, 1, dtype=torch.float64))
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{total:.9g};".encode())
    return h.hexdigest()[:16]


def encoder_settings(encoder) -> dict:
    """What about the encoder changes the embeddings."""
    model = encoder.model
    # FP8 changes the embeddings; recorded only when used, so manifests of unquantized jobs still resume
    quantization = getattr(encoder, "quantization", None)
    fp8 = (
        {
            "quantization": quantization,
            "high_precision_layers": encoder.quantization_report["high_precision_layers"],
            "fp8_rounding": encoder.quantization_report["rounding"],
        }
        if quantization
        else {}
    )
    # a float32 residual stream changes them too; recorded only when used, for the same reason
    stream = residual_dtype(model)
    wide = {"residual_dtype": str(stream).replace("torch.", "")} if stream is not None else {}
    return {
        "weights": weights_fingerprint(model),
        "dimension": int(encoder.hidden_size),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "pooling_mode": encoder.pooling_mode,
        "max_length": encoder.max_length,
        "doc_max_length": encoder.doc_max_length,
        "skip_instruction": encoder.skip_instruction,
        "model_id": encoder.model_id,
        "bidirectional": bool(is_bidirectional(model)),
        **fp8,
        **wide,
    }


def model_path(encoder) -> str | None:
    """Where the weights came from (recorded in the manifest, not compared)."""
    return getattr(encoder.model.config, "_name_or_path", None) or None


def job_settings(encoder_info: dict, plan, options, on_bad_row: str, input_format: str | None) -> dict:
    fields = options.fields
    return {
        "model": encoder_info,
        "text_field": fields.text,
        "id_field": fields.id,
        "instruction_field": fields.instruction,
        "instruction": options.instruction,
        "chunk_rows": plan.chunk_rows,
        "dtype_out": options.dtype_out,
        "on_bad_row": on_bad_row,
        "input_format": input_format,
        "inputs": [{"path": os.path.abspath(f.path), "rows": f.rows, "bytes": f.bytes} for f in plan.files],
    }
