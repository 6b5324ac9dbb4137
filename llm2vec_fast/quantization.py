"""Smaller embeddings: Matryoshka truncation and output precisions (float16, int8, uint8, binary).

The semantics are those of sentence-transformers (``truncate_dim`` and
``sentence_transformers.quantization.quantize_embeddings``), so vectors from llm2vec-fast and from
a sentence-transformers pipeline are interchangeable in a vector database:

* truncation keeps the first ``truncate_dim`` coordinates and happens *before* L2 normalisation;
* ``int8`` / ``uint8`` map each dimension's ``[min, max]`` calibration range onto 256 buckets
  (``floor((x - min) / ((max - min) / 255))``, clipped to ``[0, 255]``; ``int8`` subtracts 128);
  the ranges come from ``ranges``, else from ``calibration_embeddings``, else from the embeddings
  being quantized (then the codes of two calls are not comparable, so this is logged);
* ``binary`` / ``ubinary`` keep the sign bit (``x > 0``) packed 8 dimensions per byte
  (``ubinary``: ``np.packbits``; ``binary``: the same bytes minus 128, as ``int8``);
* ``float16`` (not in sentence-transformers) is a plain cast.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
SCALAR_PRECISIONS = ("int8", "uint8")
# fewer calibration embeddings than this give unstable int8/uint8 ranges (sentence-transformers warns too)
MIN_CALIBRATION_SIZE = 100
# numpy dtype of quantize_embeddings' output per precision (the server's base64 bytes use it, little-endian)
PRECISION_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "binary": np.dtype("i1"),
    "ubinary": np.dtype("u1"),
}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def check_truncate_dim(truncate_dim: int | None, dim: int) -> None:
    """``truncate_dim`` must be ``None`` or an integer in ``[1, dim]``."""
    if truncate_dim is None:
        return
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)) or truncate_dim < 1:
        raise ValueError(f"truncate_dim must be a positive integer or None, got {truncate_dim!r}")
    if truncate_dim > dim:
        raise ValueError(f"truncate_dim={truncate_dim} exceeds the embedding dimension {dim}")


def truncate_embeddings(embeddings: torch.Tensor | np.ndarray, truncate_dim: int | None):
    """The first ``truncate_dim`` coordinates of each embedding (Matryoshka prefix); ``None``: unchanged."""
    if truncate_dim is None:
        return embeddings
    check_truncate_dim(truncate_dim, embeddings.shape[-1])
    return embeddings[..., :truncate_dim]


def truncate_and_normalize(embeddings: torch.Tensor, truncate_dim: int | None, normalize: bool) -> torch.Tensor:
    """The float embeddings that get quantized: the first ``truncate_dim`` coordinates, then L2
    normalisation if asked (sentence-transformers' order). ``encode()`` and the server both use it."""
    embeddings = truncate_embeddings(embeddings, truncate_dim)
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=-1)
    return embeddings


class CalibrationSet:
    """Float calibration embeddings (full dimension, not normalised) that give int8/uint8 ranges for
    any ``truncate_dim`` / normalisation: ``ranges(d, normalize)`` equals
    ``calibration_ranges(truncate_and_normalize(embeddings, d, normalize))``, which is what
    ``encode(..., calibration_embeddings=...)`` uses when those embeddings went through the same
    truncation and normalisation. Ranges are computed once per setting."""

    def __init__(self, embeddings, source: str = "calibration set"):
        emb = _as_float_array(embeddings, "calibration embeddings")
        if emb.ndim != 2 or emb.shape[0] < 2:
            raise ValueError(f"a calibration set needs at least two embeddings [N, dim], got shape {emb.shape}")
        self.embeddings = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        self.source = source
        self._ranges: dict[tuple[int | None, bool], np.ndarray] = {}

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def ranges(self, truncate_dim: int | None, normalize: bool) -> np.ndarray:
        key = (None if truncate_dim in (None, self.embeddings.shape[1]) else int(truncate_dim), bool(normalize))
        if key not in self._ranges:
            self._ranges[key] = calibration_ranges(truncate_and_normalize(self.embeddings, *key))
        return self._ranges[key]


def _as_float_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.dtype in (np.int8, np.uint8) or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be float embeddings, got dtype {x.dtype}")
    return x


def calibration_ranges(calibration_embeddings) -> np.ndarray:
    """Per-dimension ``[min; max]`` (shape ``[2, dim]``, float32) of a calibration set of float
    embeddings ``[N, dim]``: pass it as ``ranges`` to quantize any later embedding the same way."""
    emb = _as_float_array(calibration_embeddings, "calibration_embeddings")
    if emb.ndim != 2 or emb.shape[0] < 1:
        raise ValueError(f"calibration_embeddings must be a non-empty [N, dim] matrix, got shape {emb.shape}")
    if emb.shape[0] < MIN_CALIBRATION_SIZE:
        logger.warning(
            "int8/uint8 ranges from only %d calibration embeddings; %d or more give more stable buckets",
            emb.shape[0],
            MIN_CALIBRATION_SIZE,
        )
    return np.vstack((emb.min(axis=0), emb.max(axis=0))).astype(np.float32)


def quantize_embeddings(
    embeddings,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings=None,
    *,
    return_ranges: bool = False,
):
    """Quantize float embeddings ``[N, dim]`` (or ``[dim]``) to ``precision``; returns a numpy array
    (``[N, dim]`` for float16/int8/uint8, ``[N, ceil(dim / 8)]`` for binary/ubinary).

    ``ranges`` (``[2, dim]``: per-dimension min and max) or ``calibration_embeddings`` set the
    int8/uint8 buckets; without either they are computed from ``embeddings`` (at least two rows)
    and logged. ``return_ranges=True`` also returns the ranges used (``None`` for other precisions).
    """
    check_precision(precision)
    emb = _as_float_array(embeddings, "embeddings")
    used = None
    if precision == "float32":
        out = emb.astype(np.float32)
    elif precision == "float16":
        out = emb.astype(np.float16)
    elif precision in SCALAR_PRECISIONS:
        used = _resolve_ranges(emb, precision, ranges, calibration_embeddings)
        starts = used[0, :]
        steps = (used[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        codes = np.clip(np.floor((emb - starts) / steps), 0, 255)
        out = codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)
    else:
        bits = np.packbits(emb > 0, axis=-1)
        out = bits if precision == "ubinary" else (bits - 128).astype(np.int8)
    return (out, used) if return_ranges else out


def _resolve_ranges(emb: np.ndarray, precision: str, ranges, calibration_embeddings) -> np.ndarray:
    dim = emb.shape[-1]
    if ranges is not None:
        ranges = np.asarray(ranges.detach().cpu().numpy() if isinstance(ranges, torch.Tensor) else ranges)
        if ranges.shape != (2, dim):
            raise ValueError(f"{precision} ranges must have shape (2, {dim}) (per-dimension min and max), got {ranges.shape}")
        return ranges.astype(np.float32, copy=False)
    if calibration_embeddings is not None:
        cal = _as_float_array(calibration_embeddings, "calibration_embeddings")
        if cal.ndim != 2 or cal.shape[1] != dim:
            raise ValueError(
                f"calibration_embeddings must be [N, {dim}] like the embeddings being quantized (same truncate_dim "
                f"and normalisation), got shape {cal.shape}"
            )
        return calibration_ranges(cal)
    if emb.ndim == 1 or emb.shape[0] < 2:
        raise ValueError(
            f"cannot compute {precision} ranges from a single embedding: pass ranges= (see "
            "llm2vec_fast.quantization.calibration_ranges) or calibration_embeddings="
        )
    logger.warning(
        "%s ranges computed from the %d embeddings being quantized; codes from another call will use other "
        "buckets. Pass ranges= or calibration_embeddings= for comparable codes.",
        precision,
        emb.shape[0],
    )
    return calibration_ranges(emb)
