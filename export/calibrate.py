"""Calibration for int8: pick the decoder layers whose MatMuls may run with int8 activations.

Block-wise int8 activations (MatMulNBits ``accuracy_level=4``) are about twice as fast as fp32
compute on CPU, but some layers are very sensitive to them (a bidirectional decoder that was never
trained bidirectionally, like the untuned default model, amplifies small errors). We measure it:

1. each layer alone with int8 activations, the rest fp32 -> min cosine to the torch fp32
   embeddings of the calibration sentences;
2. layers sorted from least to most sensitive; the longest prefix whose combined graph still meets
   ``min_cos`` / ``mean_cos`` (binary search) gets int8 compute; the other layers keep plain fp32
   MatMuls (faster than int8 weights with fp32 compute).

The calibration thresholds are stricter than the validation thresholds because the minimum over
a few calibration sentences underestimates the tail on new text (measured on the default model:
calibration min 0.996 -> STS-B dev min 0.963 with looser thresholds).

Calibration text: STS-B *train* sentences (never the dev split used for validation), or a small
built-in list when the data is not available.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from .quantize import int8_nodes_by_layer, set_int8_compute

logger = logging.getLogger(__name__)

FALLBACK_SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar on a stage.",
    "A woman is slicing an onion in the kitchen.",
    "The stock market fell sharply on Monday after the announcement.",
    "Two dogs are running through a snowy field.",
    "The committee will publish its final report next week.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Kids are playing football in the park while their parents watch.",
    "The new bridge reduced the commute by twenty minutes.",
    "A cat sleeps on the windowsill.",
    "Heavy rain caused flooding in several neighbourhoods overnight.",
]


def calibration_sentences(n: int = 64, data_dir=None) -> list[str]:
    """``n`` STS-B train sentences spread over the split (fallback: a built-in list)."""
    try:
        from ..stsb import stsb_sentences

        pool = stsb_sentences("train", data_dir)
    except (FileNotFoundError, ValueError, ImportError):
        logger.warning("STS-B train split not found; calibrating on %d built-in sentences", len(FALLBACK_SENTENCES))
        return list(FALLBACK_SENTENCES)
    step = max(1, len(pool) // n)
    return pool[::step][:n]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def select_int8_compute(
    model: onnx.ModelProto,
    embed: Callable[[onnx.ModelProto], np.ndarray],
    reference: np.ndarray,
    min_cos: float = 0.998,
    mean_cos: float = 0.9995,
) -> tuple[set[str], dict]:
    """Node names to run with int8 activations, and a summary for the export report.

    ``embed(model)`` returns the calibration embeddings of a candidate graph.
    """
    groups = int8_nodes_by_layer(model)

    def score(layers: Sequence[str]) -> tuple[float, float]:
        names = {n for g in layers for n in groups[g]}
        c = cosine_rows(embed(set_int8_compute(model, names)), reference)
        return float(c.min()), float(c.mean())

    single = {g: score([g]) for g in groups}
    order = sorted(groups, key=lambda g: -single[g][0])
    ok = lambda s: s[0] >= min_cos and s[1] >= mean_cos  # noqa: E731
    lo, hi, best = 0, len(order), (1.0, 1.0)
    while lo < hi:  # largest prefix that passes
        mid = (lo + hi + 1) // 2
        s = score(order[:mid])
        if ok(s):
            lo, best = mid, s
        else:
            hi = mid - 1
    chosen = order[:lo]
    set_int8_compute(model, {n for g in chosen for n in groups[g]})
    summary = {
        "int8_compute_layers": sorted(chosen, key=lambda g: order.index(g)),
        "fp32_compute_layers": order[lo:],
        "calibration_min_cos": round(best[0], 6),
        "calibration_mean_cos": round(best[1], 6),
        "thresholds": {"min_cos": min_cos, "mean_cos": mean_cos},
    }
    logger.info("int8 compute on %d of %d layers (calibration min cos %.4f)", lo, len(order), best[0])
    return {n for g in chosen for n in groups[g]}, summary
