"""Choosing, decoder layer by decoder layer, where a lower-precision matmul scheme may run.

Shared by every scheme that quantizes the decoder's linear layers (the ONNX int8 export in
``export/calibrate.py``, FP8 encoding in :mod:`llm2vec_fast.fp8`). A scheme is two fake-quantizers:
``fake_activation(x)`` (quantize-dequantize of a linear layer's input) and ``fake_weight(w)`` (of its
weight). How much error a matmul makes locally says little about the embeddings (one layer of the
untrained bidirectional SmolLM2 turns tokens into values in the thousands with a gain that a 1 %
upstream error moves by 25-35 %), so the embeddings are measured:

1. **sensitivity** (:meth:`QuantSimulator.layer_sensitivity`): one torch pass per decoder layer over
   a subset of the calibration inputs, with the scheme simulated on that layer's ``nn.Linear``
   modules only, scored by min / mean cosine to the high-precision embeddings;
2. **selection** (:func:`select_quantized_layers`): a layer that misses ``min_cos`` / ``mean_cos``
   on its own stays in high precision; the others sorted from the least to the most sensitive; the
   longest prefix whose *combined* simulation keeps the thresholds on all calibration inputs (all of
   them first, then a binary search), optionally confirmed on the real engine (a prefix it misses is
   shortened until it passes).

Calibration inputs: STS-B *train* sentences (never the dev split used for validation), a third of
them as ``[instruction, text]`` pairs (instructions are attended to but not pooled, and move the
embeddings differently), or a small built-in list when the data is not available.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

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
CALIBRATION_INPUTS = 96  # inputs the layer calibration embeds by default

FakeQuantizer = Callable[[torch.Tensor], torch.Tensor]


def calibration_sentences(n: int = 64, data_dir=None) -> list[str]:
    """``n`` STS-B train sentences spread over the split (fallback: a built-in list)."""
    try:
        from .stsb import stsb_sentences

        pool = stsb_sentences("train", data_dir)
    except (FileNotFoundError, ValueError, ImportError):
        logger.warning("STS-B train split not found; calibrating on %d built-in sentences", len(FALLBACK_SENTENCES))
        return list(FALLBACK_SENTENCES)
    step = max(1, len(pool) // n)
    return pool[::step][:n]


def calibration_inputs(n: int = CALIBRATION_INPUTS, data_dir=None) -> list[str | list[str]]:
    """:func:`calibration_sentences`, every third one as an ``[instruction, text]`` pair."""
    return with_instructions(calibration_sentences(n, data_dir))


def with_instructions(texts: list[str]) -> list[str | list[str]]:
    """``texts`` with every third one paired with a calibration instruction, as calibration sees them."""
    return [[CALIBRATION_INSTRUCTIONS[(i // 3) % len(CALIBRATION_INSTRUCTIONS)], t] if i % 3 == 2 else t for i, t in enumerate(texts)]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def cos_summary(embeddings: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(min, mean)`` cosine of each row of ``embeddings`` to the same row of ``reference``."""
    c = cosine_rows(embeddings, reference)
    return float(c.min()), float(c.mean())


def decoder_layer_linears(encoder, name: Callable[[str], str] = lambda path: path) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, its ``nn.Linear`` modules keyed by ``name(path)``, ``path`` being the
    module's path in the decoder (``layers.3.mlp.down_proj``)."""
    from .bidirectional import decoder_of

    return [
        {name(f"layers.{i}.{sub}"): m for sub, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for i, layer in enumerate(decoder_of(encoder.model).layers)
    ]


def _embed(encoder, inputs: Sequence, batch_size: int) -> np.ndarray:
    return np.asarray(encoder.encode(list(inputs), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True))


class QuantSimulator:
    """A quantization scheme simulated in torch on chosen decoder linear layers of ``encoder``:
    fake-quantized weights swapped in, inputs fake-quantized by a pre-hook; everything is restored
    after each use. ``cache_weights``: keep each rounded weight after its first use (the search
    reuses them; leave it off when a second copy of the weights does not fit). ``rounded_weights``:
    weights already rounded elsewhere (GPTQ's), keyed by the names in ``layers``, ``[out, in]``
    as the modules hold them, used instead of ``fake_weight``."""

    def __init__(
        self,
        encoder,
        fake_activation: FakeQuantizer,
        fake_weight: FakeQuantizer,
        layers: list[dict[str, nn.Linear]] | None = None,
        batch_size: int = 32,
        cache_weights: bool = True,
        rounded_weights: Mapping[str, torch.Tensor] | None = None,
    ):
        self.encoder = encoder
        self.fake_activation = fake_activation
        self.fake_weight = fake_weight
        self.batch_size = batch_size
        self.cache_weights = cache_weights
        self.layers = decoder_layer_linears(encoder) if layers is None else layers
        self.modules = {name: m for layer in self.layers for name, m in layer.items()}
        self._given: Mapping[str, torch.Tensor] = rounded_weights if rounded_weights is not None else {}
        self._rounded: dict[str, torch.Tensor] = {}

    def _rounded_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self._given:
            return self._given[name]
        if name in self._rounded:
            return self._rounded[name]
        rounded = self.fake_weight(weight)
        if self.cache_weights:
            self._rounded[name] = rounded
        return rounded

    @contextlib.contextmanager
    def applied(self, names: set[str], weights: bool = True, activations: bool = True) -> Iterator[None]:
        """Within the block, the linear layers ``names`` run the scheme (or only its weight or only
        its activation rounding, to study each alone)."""
        chosen = [(n, self.modules[n]) for n in sorted(names) if n in self.modules]
        saved = [(m, m.weight.data) for _, m in chosen]
        fake = self.fake_activation
        hooks = [m.register_forward_pre_hook(lambda mod, args: (fake(args[0]), *args[1:])) for _, m in chosen if activations]
        try:
            for name, m in chosen if weights else []:
                m.weight.data = self._rounded_weight(name, m.weight.data)
            yield
        finally:
            for h in hooks:
                h.remove()
            for m, w in saved:
                m.weight.data = w

    @torch.no_grad()
    def embed(self, names: set[str], inputs: Sequence, weights: bool = True, activations: bool = True) -> np.ndarray:
        """Embeddings of ``inputs`` with the scheme simulated on the linear layers ``names`` (see :meth:`applied`)."""
        with self.applied(names, weights, activations):
            return _embed(self.encoder, inputs, self.batch_size)

    def layer_sensitivity(
        self, inputs: Sequence, reference: np.ndarray, progress: Callable[[str], None] | None = None
    ) -> list[tuple[float, float]]:
        """``(min cos, mean cos)`` of the embeddings of ``inputs`` to ``reference`` (their
        high-precision embeddings) with the scheme simulated on one decoder layer at a time, per layer."""
        out = []
        for i, layer in enumerate(self.layers):
            out.append(cos_summary(self.embed(set(layer), inputs), reference))
            if progress and ((i + 1) % 10 == 0 or i + 1 == len(self.layers)):
                progress(f"sensitivity of {i + 1}/{len(self.layers)} layers measured")
        return out


def select_quantized_layers(
    layers: Sequence[Sequence[str]],
    sensitivity: Sequence[tuple[float, float]],
    embed: Callable[[set[str]], np.ndarray],
    reference: np.ndarray,
    confirm: Callable[[set[str]], np.ndarray] | None = None,
    min_cos: float = 0.99,
    mean_cos: float = 0.997,
    progress: Callable[[str], None] | None = None,
    low: str = "int8",
    high: str = "fp32",
    engines: tuple[str, str] = ("torch", "onnxruntime"),
) -> tuple[set[str], dict]:
    """Linear-layer names to run in the low precision ``low``, and a summary for a report (keys
    named after ``low`` and ``high``, e.g. ``int8_layers`` / ``fp32_layers``).

    ``layers[i]`` are layer ``i``'s names and ``sensitivity[i]`` its single-layer
    ``(min cos, mean cos)``. ``embed(names)`` returns the calibration embeddings with ``names``
    simulated (the search, on engine ``engines[0]``); ``confirm(names)``, when given, the same from
    the real engine ``engines[1]``: the chosen prefix is shortened until it passes there too.
    """
    ok = lambda s: s[0] >= min_cos and s[1] >= mean_cos  # noqa: E731
    # a layer that misses the thresholds on its own stays in high precision without a trial
    order = sorted((i for i in range(len(layers)) if ok(sensitivity[i])), key=lambda i: (-sensitivity[i][0], -sensitivity[i][1], i))
    high_alone = sorted(set(range(len(layers))) - set(order))
    trials = []

    def names(k: int) -> set[str]:
        return {n for i in order[:k] for n in layers[i]}

    def score(k: int, fn, engine: str) -> tuple[float, float]:
        s = cos_summary(fn(names(k)), reference)
        trials.append({f"{low}_layers": k, "engine": engine, "min_cos": round(s[0], 6), "mean_cos": round(s[1], 6)})
        if progress:
            progress(f"{k}/{len(order)} layers {low} ({engine}): min cos {s[0]:.4f}, mean {s[1]:.5f}")
        return s

    lo, hi, best = 0, len(order), (1.0, 1.0)
    if hi:
        s = score(hi, embed, engines[0])  # all of them in low precision is the common case on well-behaved models
        if ok(s):
            lo, best = hi, s
        else:
            hi -= 1
    while lo < hi:  # largest prefix that passes
        mid = (lo + hi + 1) // 2
        s = score(mid, embed, engines[0])
        if ok(s):
            lo, best = mid, s
        else:
            hi = mid - 1
    while confirm is not None and lo > 0:
        s = score(lo, confirm, engines[1])
        if ok(s):
            best = s
            break
        lo -= 1
    chosen = names(lo)
    summary = {
        f"{low}_matmuls": len(chosen),
        f"{low}_layers": sorted(order[:lo]),
        f"{low}_layer_order": order[:lo],  # most robust first: a fallback drops from the end
        f"{high}_layers": sorted(order[lo:] + high_alone),
        f"{high}_layers_alone": high_alone,
        "layer_sensitivity": [{"layer": i, "min_cos": round(a, 6), "mean_cos": round(b, 6)} for i, (a, b) in enumerate(sensitivity)],
        "calibration_min_cos": round(best[0], 6),
        "calibration_mean_cos": round(best[1], 6),
        "calibration_thresholds": {"min_cos": min_cos, "mean_cos": mean_cos},
        "calibration_trials": trials,
    }
    logger.info("%s on %d of %d layers (%d matmuls; calibration min cos %.4f)", low, lo, len(order), len(chosen), best[0])
    return chosen, summary
