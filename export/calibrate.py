"""Calibration for int8: choose, node by node, the MatMuls that run in int8.

The int8 product (``quantize.rowwise_int8_matmuls``: int8 activations with one scale per token,
7-bit per-column weights, ``MatMulInteger``) is not harmless everywhere: some decoders amplify
small errors (the untrained bidirectional SmolLM2 turns many tokens into values in the
thousands at layer 11, with a gain that int8 rounding upstream moves a lot). We measure it:

1. one torch pass over the calibration sentences simulates the int8 product of every decoder
   ``nn.Linear`` on its real inputs and records its relative output error per token, averaged
   over tokens (:func:`int8_error_by_node`; a tensor-wide relative error would hide the normal
   tokens behind a huge token's accurate output);
2. MatMuls sorted from the smallest to the largest error; the longest prefix whose graph still
   meets ``min_cos`` / ``mean_cos`` against the torch fp32 embeddings (binary search, each step
   run by ONNX Runtime) goes int8; the rest keep plain fp32 MatMuls.

The calibration thresholds are stricter than the validation thresholds because the minimum over
a few calibration sentences underestimates the tail on new text.

Calibration text: STS-B *train* sentences (never the dev split used for validation), or a small
built-in list when the data is not available.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import re

import numpy as np
import torch
from torch import nn

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


def onnx_matmul_name(module_name: str) -> str:
    """The TorchScript exporter's MatMul node name for decoder submodule ``module_name``
    (``layers.3.mlp.down_proj`` -> ``/decoder/layers.3/mlp/down_proj/MatMul``)."""
    path = re.sub(r"(^|/)layers/(\d+)", r"\1layers.\2", module_name.replace(".", "/"))
    return f"/decoder/{path}/MatMul"


def _fake_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize with one scale per row (token), as
    :func:`~.quantize.rowwise_int8_matmuls` does in the graph."""
    from .quantize import ROW_ACTIVATION_LEVELS

    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / ROW_ACTIVATION_LEVELS
    return torch.clamp(torch.round(x / scale), -ROW_ACTIVATION_LEVELS, ROW_ACTIVATION_LEVELS) * scale


@torch.no_grad()
def int8_error_by_node(encoder, texts: Sequence, batch_size: int = 32) -> tuple[dict[str, float], np.ndarray]:
    """Mean over tokens of the relative error ``||Q(x) Q(W) - x W|| / ||x W||`` of every decoder
    ``nn.Linear`` under the int8 scheme over ``texts`` (worst batch), keyed by ONNX MatMul node name, and the torch fp32
    embeddings of ``texts`` (the hooks only observe)."""
    from ..bidirectional import decoder_of
    from .quantize import quantize_columns

    decoder = decoder_of(encoder.model)
    errors: dict[str, float] = {}
    hooks = []

    def hook(name: str, module: nn.Linear):
        q, scale = quantize_columns(module.weight.detach().float().cpu().numpy().T)
        wq = torch.from_numpy(q.T.astype(np.float32) * scale[:, None])

        def record(mod, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu()
            exact = x @ mod.weight.detach().float().cpu().T
            # error per token, then averaged: a tensor-wide norm would hide small tokens' errors
            # behind a huge token's accurate output
            row_err = torch.linalg.norm(_fake_int8_rows(x) @ wq.T - exact, dim=1) / torch.linalg.norm(exact, dim=1).clamp(min=1e-12)
            errors[name] = max(errors.get(name, 0.0), float(row_err.mean()))

        return record

    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            hooks.append(module.register_forward_hook(hook(onnx_matmul_name(name), module)))
    try:
        embeddings = np.asarray(encoder.encode(list(texts), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True))
    finally:
        for h in hooks:
            h.remove()
    return errors, embeddings


def select_int8_nodes(
    candidates: Sequence[str],
    errors: dict[str, float],
    embed: Callable[[set[str]], np.ndarray],
    reference: np.ndarray,
    min_cos: float = 0.99,
    mean_cos: float = 0.997,
    progress: Callable[[str], None] | None = None,
) -> tuple[set[str], dict]:
    """MatMul node names to run in int8, and a summary for the export report.

    ``embed(names)`` returns the calibration embeddings of the graph with ``names`` in int8.
    Candidates without a measured error (not inside a decoder layer) are tried last.
    """
    order = sorted(candidates, key=lambda n: (n not in errors, errors.get(n, 0.0)))
    ok = lambda s: s[0] >= min_cos and s[1] >= mean_cos  # noqa: E731
    trials = []

    def score(k: int) -> tuple[float, float]:
        c = cosine_rows(embed(set(order[:k])), reference)
        s = (float(c.min()), float(c.mean()))
        trials.append({"int8_nodes": k, "min_cos": round(s[0], 6), "mean_cos": round(s[1], 6)})
        if progress:
            progress(f"{k}/{len(order)} MatMuls int8: calibration min cos {s[0]:.4f}, mean {s[1]:.5f}")
        return s

    lo, hi, best = 0, len(order), (1.0, 1.0)
    s = score(hi)  # everything int8 is the common case on well-behaved models
    if ok(s):
        lo, best = hi, s
    else:
        hi -= 1
    while lo < hi:  # largest prefix that passes
        mid = (lo + hi + 1) // 2
        s = score(mid)
        if ok(s):
            lo, best = mid, s
        else:
            hi = mid - 1
    chosen = order[:lo]
    summary = {
        "int8_matmuls": len(chosen),
        "fp32_matmuls": order[lo:],
        "calibration_min_cos": round(best[0], 6),
        "calibration_mean_cos": round(best[1], 6),
        "calibration_thresholds": {"min_cos": min_cos, "mean_cos": mean_cos},
        "calibration_trials": trials,
    }
    logger.info("int8 on %d of %d MatMuls (calibration min cos %.4f)", lo, len(order), best[0])
    return set(chosen), summary
