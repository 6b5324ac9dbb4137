"""Calibration for int8: choose, decoder layer by decoder layer, where int8 runs.

The int8 product (``quantize.rowwise_int8_matmuls``: int8 activations with one scale per token,
7-bit per-column weights, ``MatMulIntegerToFloat``) is harmless in some layers and ruinous in others.
In the untrained bidirectional SmolLM2, layer 11 turns many tokens into values in the thousands
with a gain that ~1 % upstream error moves by 25-35 %, and the last layers partly cancel those
values again: int8 on layer 0 *alone* drops the worst sentence to cos 0.35, while int8 on any one
of layers 12-26 keeps it above 0.998. How much error a MatMul makes locally says nothing about
this (the previous calibration sorted by local error and stopped at 2 MatMuls), so we measure
what matters, the embeddings:

1. **sensitivity** (:meth:`Int8Simulator.layer_sensitivity`): one torch pass per decoder layer over a
   subset of the calibration inputs, with the int8 scheme simulated on that layer's ``nn.Linear``
   modules only (the same per-token activation and per-column weight rounding as the graph),
   scored by min / mean cosine to the fp32 embeddings;
2. **selection** (:func:`select_int8_layers`): a layer that misses ``min_cos`` / ``mean_cos``
   on its own stays fp32; the others sorted from the least to the most sensitive; the longest
   prefix whose *combined* simulated int8 keeps the thresholds on all calibration inputs (all of
   them first, then a binary search), confirmed with ONNX Runtime on the real graph (a prefix the
   graph misses is shortened until it passes).

The calibration thresholds are stricter than the validation thresholds because the minimum over
a hundred calibration inputs underestimates the tail on new text.

Calibration inputs: STS-B *train* sentences (never the dev split used for validation), a third of
them as ``[instruction, text]`` pairs (instructions are attended to but not pooled, and move the
embeddings differently), or a small built-in list when the data is not available.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence

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
# calibration-only instructions (validation and the benchmarks use others)
CALIBRATION_INSTRUCTIONS = (
    "Represent this sentence for searching relevant passages:",
    "Identify the main topic of the text",
    "Find a paraphrase of the given sentence",
)
SENSITIVITY_INPUTS = 32  # the per-layer ranking needs an order, not the tail: a third of the inputs, of the time


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


def calibration_inputs(n: int = 96, data_dir=None) -> list[str | list[str]]:
    """:func:`calibration_sentences`, every third one as an ``[instruction, text]`` pair."""
    texts = calibration_sentences(n, data_dir)
    return [[CALIBRATION_INSTRUCTIONS[(i // 3) % len(CALIBRATION_INSTRUCTIONS)], t] if i % 3 == 2 else t for i, t in enumerate(texts)]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def onnx_matmul_name(module_name: str) -> str:
    """The TorchScript exporter's MatMul node name for decoder submodule ``module_name``
    (``layers.3.mlp.down_proj`` -> ``/decoder/layers.3/mlp/down_proj/MatMul``)."""
    path = re.sub(r"(^|/)layers/(\d+)", r"\1layers.\2", module_name.replace(".", "/"))
    return f"/decoder/{path}/MatMul"


def decoder_layer_linears(encoder) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, its ``nn.Linear`` modules keyed by their ONNX MatMul node name."""
    from ..bidirectional import decoder_of

    return [
        {onnx_matmul_name(f"layers.{i}.{name}"): m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for i, layer in enumerate(decoder_of(encoder.model).layers)
    ]


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


def _embed(encoder, inputs: Sequence, batch_size: int) -> np.ndarray:
    return np.asarray(encoder.encode(list(inputs), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True))


def _cos_summary(embeddings: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    c = cosine_rows(embeddings, reference)
    return float(c.min()), float(c.mean())


class Int8Simulator:
    """The int8 scheme simulated in torch on chosen decoder MatMuls of ``encoder``: int8-rounded
    weights swapped in (rounded once, cached), inputs rounded per token by a pre-hook;
    everything is restored after each use."""

    def __init__(self, encoder, batch_size: int = 32):
        self.encoder = encoder
        self.batch_size = batch_size
        self.layers = decoder_layer_linears(encoder)
        self.modules = {name: m for layer in self.layers for name, m in layer.items()}
        self._rounded: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def applied(self, names: set[str]) -> Iterator[None]:
        chosen = [(n, self.modules[n]) for n in sorted(names) if n in self.modules]
        saved = [(m, m.weight.data) for _, m in chosen]
        hooks = [m.register_forward_pre_hook(lambda mod, args: (_fake_int8_rows(args[0]), *args[1:])) for _, m in chosen]
        try:
            for name, m in chosen:
                if name not in self._rounded:
                    self._rounded[name] = _fake_int8_weight(m.weight.data)
                m.weight.data = self._rounded[name]
            yield
        finally:
            for h in hooks:
                h.remove()
            for m, w in saved:
                m.weight.data = w

    @torch.no_grad()
    def embed(self, names: set[str], inputs: Sequence) -> np.ndarray:
        """Embeddings of ``inputs`` with int8 simulated on the MatMuls ``names``."""
        with self.applied(names):
            return _embed(self.encoder, inputs, self.batch_size)

    def layer_sensitivity(
        self, inputs: Sequence, reference: np.ndarray, progress: Callable[[str], None] | None = None
    ) -> list[tuple[float, float]]:
        """``(min cos, mean cos)`` of the embeddings of ``inputs`` to ``reference`` (their fp32
        embeddings) with int8 simulated on one decoder layer at a time, per layer."""
        out = []
        for i, layer in enumerate(self.layers):
            out.append(_cos_summary(self.embed(set(layer), inputs), reference))
            if progress and ((i + 1) % 10 == 0 or i + 1 == len(self.layers)):
                progress(f"sensitivity of {i + 1}/{len(self.layers)} layers measured")
        return out


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
    """MatMul node names to run in int8, and a summary for the export report.

    ``layers[i]`` are layer ``i``'s MatMul names and ``sensitivity[i]`` its single-layer
    ``(min cos, mean cos)``. ``embed(names)`` returns the calibration embeddings with ``names`` in
    int8 (the search); ``confirm(names)``, when given, the same from the real graph: the chosen
    prefix is shortened until it passes there too.
    """
    ok = lambda s: s[0] >= min_cos and s[1] >= mean_cos  # noqa: E731
    # a layer that misses the thresholds on its own stays fp32 without a trial
    order = sorted((i for i in range(len(layers)) if ok(sensitivity[i])), key=lambda i: (-sensitivity[i][0], -sensitivity[i][1], i))
    fp32_alone = sorted(set(range(len(layers))) - set(order))
    trials = []

    def names(k: int) -> set[str]:
        return {n for i in order[:k] for n in layers[i]}

    def score(k: int, fn, engine: str) -> tuple[float, float]:
        s = _cos_summary(fn(names(k)), reference)
        trials.append({"int8_layers": k, "engine": engine, "min_cos": round(s[0], 6), "mean_cos": round(s[1], 6)})
        if progress:
            progress(f"{k}/{len(order)} layers int8 ({engine}): min cos {s[0]:.4f}, mean {s[1]:.5f}")
        return s

    lo, hi, best = 0, len(order), (1.0, 1.0)
    if hi:
        s = score(hi, embed, "torch")  # all of them int8 is the common case on well-behaved models
        if ok(s):
            lo, best = hi, s
        else:
            hi -= 1
    while lo < hi:  # largest prefix that passes
        mid = (lo + hi + 1) // 2
        s = score(mid, embed, "torch")
        if ok(s):
            lo, best = mid, s
        else:
            hi = mid - 1
    while confirm is not None and lo > 0:
        s = score(lo, confirm, "onnxruntime")
        if ok(s):
            best = s
            break
        lo -= 1
    chosen = names(lo)
    summary = {
        "int8_matmuls": len(chosen),
        "int8_layers": sorted(order[:lo]),
        "fp32_layers": sorted(order[lo:] + fp32_alone),
        "fp32_layers_alone": fp32_alone,
        "layer_sensitivity": [{"layer": i, "min_cos": round(a, 6), "mean_cos": round(b, 6)} for i, (a, b) in enumerate(sensitivity)],
        "calibration_min_cos": round(best[0], 6),
        "calibration_mean_cos": round(best[1], 6),
        "calibration_thresholds": {"min_cos": min_cos, "mean_cos": mean_cos},
        "calibration_trials": trials,
    }
    logger.info("int8 on %d of %d layers (%d MatMuls; calibration min cos %.4f)", lo, len(order), len(chosen), best[0])
    return chosen, summary
