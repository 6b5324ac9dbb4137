"""Work accounting for profiles and benchmarks: attention FLOPs, pooling bytes, card peaks, and the
per-kernel table that ``llm2vec-fast profile`` prints from ``torch.profiler`` events.

* Attention FLOPs (flash-attention convention, useful work only): ``4 * sum(L_i^2) * Hq * D`` per
  layer call (``Q K^T`` and ``P V``, two FLOPs per multiply-add). Padding is never credited.
* Encoder FLOPs (:func:`encode_flops`, for model FLOPs utilisation): the matmuls of a forward pass
  counted from the config, ``2 x`` the decoder layers' linear weights per token plus the attention
  above; no LM head (encoders have none), embedding lookups, norms and activations not counted.
* Pooling bytes (forward): the hidden states read (every token for ``mean``/``weighted_mean``, one
  row per sequence for ``last``/``first``), the one-byte-per-token mask, and the ``[B, D]`` output.
* Kernels are put in the ``attention`` / ``pooling`` category by name (Triton ``_attn_fwd_kernel`` /
  ``_pool_chunk_kernel``, SDPA kernels and ops), or by an enclosing op of that kind (the children of
  ``aten::scaled_dot_product_attention``, the ops inside a :data:`POOL_ANNOTATION` range; a CUDA
  kernel inherits the ops enclosing the op that launched it).
  A category's achieved rate is its work over the summed time of its kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

POOL_ANNOTATION = "llm2vec_fast::pool"
ATTENTION_PATTERN = re.compile(r"scaled_dot_product|attention|_attn_(fwd|bwd)|flash_(fwd|bwd)|fmha|sdpa", re.IGNORECASE)
#: The Triton pooling kernels (``kernels/pooling_triton.py``): chunk + combine (mean, weighted_mean),
#: select (last, first), backward.
POOLING_PATTERN = re.compile(r"_pool_(chunk|combine|select|bwd)_kernel|" + re.escape(POOL_ANNOTATION), re.IGNORECASE)
CATEGORIES = {"attention": ATTENTION_PATTERN, "pooling": POOLING_PATTERN}


def attention_flops(lengths: Iterable[int], num_heads: int, head_dim: int, num_layers: int = 1) -> float:
    """Useful forward FLOPs of bidirectional attention over sequences of ``lengths``."""
    return 4.0 * sum(int(n) * int(n) for n in lengths) * num_heads * head_dim * num_layers


def decoder_linear_params(config) -> int:
    """Weights in the linear layers of one decoder layer (attention projections and gated MLP) of a
    Hugging Face decoder ``config``; biases are not matmul work and are left out."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o: heads; k and v: kv_heads
    mlp = 3 * hidden * int(config.intermediate_size)  # gate, up, down (phi3's fused gate_up is the same count)
    return attention + mlp


def encode_flops(config, lengths: Iterable[int]) -> float:
    """Matmul FLOPs of one encoder forward over sequences of ``lengths`` (real tokens only):
    ``2 * decoder_linear_params * tokens * layers`` plus :func:`attention_flops` (``4 * L * Hq * D``
    per token per layer, bidirectional). No LM head: an encoder has none."""
    lengths = [int(n) for n in lengths]
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return 2.0 * decoder_linear_params(config) * sum(lengths) * layers + attention_flops(lengths, heads, head_dim, layers)


def pooling_bytes(n_tokens: int, n_seqs: int, hidden: int, element_size: int, mode: str) -> int:
    """Bytes one forward pooling must move (``mode`` as in ``kernels.masked_pool``)."""
    rows_read = n_tokens if mode in ("mean", "weighted_mean") else n_seqs
    return rows_read * hidden * element_size + n_tokens + n_seqs * hidden * element_size


# ----------------------------------------------------------------------------------- card peaks


@dataclass(frozen=True)
class CardPeak:
    """Dense datasheet peaks of one card."""

    name: str
    bf16_tflops: float  # tensor cores, dense (also fp16)
    fp32_tflops: float  # without TF32 (torch's default for matmuls)
    hbm_gbps: float

    def tflops(self, dtype) -> float:
        import torch

        return self.fp32_tflops if dtype == torch.float32 else self.bf16_tflops


# (lower-case substrings that must all be in torch.cuda.get_device_name(), peak); first match wins.
CARD_PEAKS: list[tuple[tuple[str, ...], CardPeak]] = [
    (("h200",), CardPeak("H200", 989.0, 67.0, 4800.0)),
    (("h100", "pcie"), CardPeak("H100 PCIe", 756.0, 51.0, 2000.0)),
    (("h100", "nvl"), CardPeak("H100 NVL", 835.0, 60.0, 3900.0)),
    (("h100",), CardPeak("H100 SXM", 989.0, 67.0, 3350.0)),
    (("a100", "80gb", "pcie"), CardPeak("A100 80GB PCIe", 312.0, 19.5, 1935.0)),
    (("a100", "80gb"), CardPeak("A100 SXM 80GB", 312.0, 19.5, 2039.0)),
    (("a100",), CardPeak("A100 40GB", 312.0, 19.5, 1555.0)),
]


def card_peak(device_name: str | None) -> CardPeak | None:
    """The peaks of a card from its ``torch.cuda.get_device_name()``; ``None`` for CPUs and unknown cards."""
    name = (device_name or "").lower()
    for keys, peak in CARD_PEAKS:
        if all(k in name for k in keys):
            return peak
    return None


# ---------------------------------------------------------------------------------- kernel table


@dataclass
class KernelRow:
    name: str
    category: str  # "attention", "pooling" or ""
    time_us: float
    calls: int


def _category(names: Iterable[str]) -> str:
    for name in names:
        for category, pattern in CATEGORIES.items():
            if pattern.search(name):
                return category
    return ""


def _ancestry(evt) -> Iterable[str]:
    while evt is not None:
        yield evt.name
        evt = getattr(evt, "cpu_parent", None)


def _is_annotation(evt) -> bool:
    return bool(getattr(evt, "is_user_annotation", False)) or evt.name.startswith("llm2vec_fast::")


def kernel_rows(events: Iterable, on_device: bool) -> list[KernelRow]:
    """Aggregate ``torch.profiler`` function events into rows, longest first: with ``on_device`` the
    CUDA kernels and copies by device time, else the CPU ops by self CPU time (annotations skipped)."""
    from torch.autograd import DeviceType

    events = list(events)
    # a kernel's launching op (and so its enclosing ops) by correlation id, where torch records it
    launcher = {e.id: e for e in events if e.device_type == DeviceType.CPU and e.id} if on_device else {}
    rows: dict[tuple[str, str], KernelRow] = {}
    for evt in events:
        if on_device:
            if evt.device_type != DeviceType.CUDA:
                continue
            time_us = float(evt.time_range.elapsed_us())
            names = [evt.name, *_ancestry(launcher.get(getattr(evt, "linked_correlation_id", 0) or None))]
        else:
            if evt.device_type != DeviceType.CPU or _is_annotation(evt):
                continue
            time_us = float(evt.self_cpu_time_total)
            names = _ancestry(evt)
        category = _category(names)
        row = rows.setdefault((evt.name, category), KernelRow(evt.name, category, 0.0, 0))
        row.time_us += time_us
        row.calls += 1
    return sorted(rows.values(), key=lambda r: -r.time_us)


@dataclass(frozen=True)
class Work:
    """What the profiled workload had to do, to turn kernel times into achieved rates."""

    attention_flops: float
    pooling_bytes: float
    dtype: object = None  # torch dtype of the model (selects the FLOP peak)


def category_rates(rows: Sequence[KernelRow], work: Work, peak: CardPeak | None) -> dict[str, dict]:
    """Per category: time (ms), achieved rate, unit, and fraction of the card's peak (``None`` if unknown)."""
    out = {}
    for category, amount, unit, scale in (
        ("attention", work.attention_flops, "TFLOP/s", 1e12),
        ("pooling", work.pooling_bytes, "GB/s", 1e9),
    ):
        time_us = sum(r.time_us for r in rows if r.category == category)
        rate = amount / (time_us * 1e-6) / scale if time_us > 0 else None
        peak_rate = None
        if peak is not None:
            peak_rate = peak.tflops(work.dtype) if unit == "TFLOP/s" else peak.hbm_gbps
        out[category] = {
            "time_ms": time_us / 1e3,
            "rate": rate,
            "unit": unit,
            "of_peak": rate / peak_rate if rate is not None and peak_rate else None,
            "peak": peak_rate,
        }
    return out


def format_table(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text table with a dashed header rule."""
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _fmt_rate(r: dict) -> str:
    if r["rate"] is None:
        return "n/a"
    return f"{r['rate']:.4g} {r['unit']}"


def _shorten(name: str, width: int = 64) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def render_kernel_table(rows: Sequence[KernelRow], work: Work, peak: CardPeak | None, top: int) -> str:
    """The per-kernel table (``top`` rows plus the rest summed) and one summary line per category."""
    rows = sorted(rows, key=lambda r: -r.time_us)
    total = sum(r.time_us for r in rows) or 1.0
    rates = category_rates(rows, work, peak)

    def achieved(category: str) -> tuple[str, str]:
        if not category:
            return "", ""
        r = rates[category]
        return _fmt_rate(r), "n/a" if r["of_peak"] is None else f"{100 * r['of_peak']:.1f}%"

    cells = [
        [
            _shorten(r.name),
            r.category or "-",
            f"{r.time_us / 1e3:.3f}",
            f"{100 * r.time_us / total:.1f}%",
            str(r.calls),
            *achieved(r.category),
        ]
        for r in rows[:top]
    ]
    rest = rows[top:]
    if rest:
        rest_us = sum(r.time_us for r in rest)
        cells.append(
            [f"({len(rest)} more)", "-", f"{rest_us / 1e3:.3f}", f"{100 * rest_us / total:.1f}%", str(sum(r.calls for r in rest)), "", ""]
        )
    lines = [format_table(["kernel", "kind", "total ms", "share", "calls", "achieved", "of peak"], cells), ""]
    peak_name = peak.name if peak is not None else "n/a (CPU or unknown card)"
    for category, r in rates.items():
        of_peak = "n/a" if r["of_peak"] is None else f"{100 * r['of_peak']:.1f}% of {r['peak']:.0f} {r['unit']}"
        lines.append(
            f"{category}: {r['time_ms']:.3f} ms ({100 * r['time_ms'] * 1e3 / total:.1f}% of the total), {_fmt_rate(r)}, peak: {of_peak}"
        )
    lines.append(f"total: {total / 1e3:.3f} ms over {len(rows)} kernels; card peak table: {peak_name}")
    return "\n".join(lines)
