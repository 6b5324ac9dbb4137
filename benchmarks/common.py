"""Helpers shared by the GPU benchmark scripts: card name, timing, tables, JSON and PNG output."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llm2vec_fast.profiling import format_table
from llm2vec_fast.synthetic import lognormal_lengths  # noqa: F401  (re-exported for the benchmarks)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path (tests)
from portable_paths import portable_argv, portable_path  # noqa: E402,F401  (portable_path re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def require_cuda(script: str) -> None:
    """Exit (status 1) with a clear message when there is no CUDA device or no triton."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure on this machine.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit(f"{script}: needs the triton package.")


def card_name() -> str:
    """A file-name-safe slug of the GPU name, e.g. ``h100-80gb-hbm3``; ``cpu`` without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": portable_argv(sys.argv),
    }


def time_ms(fn: Callable[[], object], quick: bool, grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn`` with ``triton.testing.do_bench`` (fewer repetitions with --quick)."""
    from triton.testing import do_bench

    warmup, rep = (5, 20) if quick else (25, 100)
    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def try_time_ms(fn: Callable[[], object], quick: bool, grad_to_none=None) -> tuple[float, str | None]:
    """``(ms, None)``, or ``(nan, reason)`` when the method is unavailable on this card/torch."""
    try:
        fn()  # compile / check support once outside the timing
        torch.cuda.synchronize()
        return time_ms(fn, quick, grad_to_none), None
    except Exception as exc:  # a baseline backend may be unsupported for a shape/dtype/torch build
        torch.cuda.synchronize()
        return math.nan, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def time_fwd_and_fwd_bwd(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], quick: bool) -> tuple[float, float, str]:
    """Milliseconds of ``fn()`` under ``no_grad`` and of ``fn().backward(ones)``; a note when one fails."""

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        out = fn()
        out.backward(torch.ones_like(out))

    ms_f, why_f = try_time_ms(fwd, quick)
    ms_fb, why_fb = try_time_ms(fwd_bwd, quick, grad_to_none=list(leaves))
    return ms_f, ms_fb, why_f or why_fb or ""


def print_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = "{:.1f}") -> None:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    print(format_table(columns, [[fmt(r.get(c, "")) for c in columns] for r in rows]))


def write_json(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>-<card>.json`` (default ``benchmarks/results``) with the environment
    added; return the path."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}-{card_name()}.json"

    def clean(v):  # JSON has no NaN
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean({"environment": environment(), **payload}), indent=2) + "\n")
    return path


def plot_grouped_bars(
    name: str,
    title: str,
    ylabel: str,
    groups: Sequence[str],
    panels: dict[str, dict[str, Sequence[float]]],
    results_dir: Path | None = None,
) -> Path | None:
    """Grouped bar charts, one panel per entry of ``panels`` (``{panel: {method: [value per group]}}``),
    one group per shape, one bar per method -> ``<results_dir>/<name>-<card>.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}-{card_name()}.png"
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.8 * len(groups)) * len(panels), 4.8), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        n = max(len(series), 1)
        width = 0.8 / n
        for i, (label, values) in enumerate(series.items()):
            xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=label)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(panel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} ({card_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def model_description(model: str | None, peft: list[str] | None) -> str:
    """What was measured, for the JSON: the shipped default encoder, the untrained base, or a folder
    (+ adapters)."""
    from llm2vec_fast.default_model import is_default_encoder, is_default_model

    if is_default_encoder(model) and not peft:
        return "SmolLM2-135M-Instruct default encoder (shipped MNTP + SimCSE adapters, merged)"
    name = "SmolLM2-135M-Instruct (embedded base)" if is_default_model(model) else portable_path(model)
    return name + (f" + merged adapters {[portable_path(p) for p in peft]}" if peft else " (no LLM2Vec training)")
