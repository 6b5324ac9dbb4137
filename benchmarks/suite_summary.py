"""Compact summary of the GPU suite's results: each headline ratio against its target.

Reads ``attention-*.json``, ``pooling-*.json``, ``encode-*.json``, ``fp8-encode-*.json``, ``fused-encode-*.json``,
``fp8-fused-encode-*.json``, ``train-*.json`` (``train-fused-*.json`` too), ``onnx-cuda-*.json`` and ``fp8-load-*.json`` from a results folder (default
``benchmarks/results``); needs neither torch nor a GPU. Prints one line per ratio and exits 0; with
``--strict`` it exits 1 when a ratio with a target misses it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Targets of ratios the issue does not fix are ``None`` (reported, not judged). Encode targets are
#: read from the encode JSON (``bench_encode.TARGETS``).
#: Issue 3 targets: forward >= cuDNN SDPA at L >= 2k, forward+backward >= 1.3x SDPA flash,
#: pooling >= 80% of copy bandwidth. ``None`` = reported without a target.
ATTENTION_TARGETS = {"fwd_vs_flash": None, "fwd_vs_cudnn": 1.0, "fwd_vs_mask4d": None, "fwd_bwd_vs_flash": 1.3}
POOLING_TARGETS = {"fwd_vs_copy": 0.8, "fwd_vs_torch_ref": None}
#: Modes that read one row per sequence: latency-bound, so a share of copy bandwidth means nothing.
#: They are reported against ``torch-gather`` (``hidden.index_select`` of precomputed rows, the floor
#: of any gather) without a target.
ONE_ROW_MODES = ("last", "first")
CUDNN_TARGET_MIN_LENGTH = 2048


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results_dir", nargs="?", type=Path, default=RESULTS_DIR, help="folder with the result JSON files")
    p.add_argument("--strict", action="store_true", help="exit 1 when a ratio misses its target")
    return p.parse_args(argv)


def _line(label: str, value, target) -> tuple[str, bool | None]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"  {label:<48} n/a", None
    if target is None:
        return f"  {label:<48} {value:6.2f}x  (no target)", None
    ok = value >= target
    return f"  {label:<48} {value:6.2f}x  target >= {target:.1f}x  {'ok' if ok else 'MISSED'}", ok


def _agreement(label: str, result: dict, floor: float) -> tuple[str, bool]:
    """``label``'s min cosine against its floor, judged by the benchmark's own ``agree``."""
    agree = bool(result.get("agree"))
    return f"  {label + ' min cosine':<48} {result.get('min_cosine', math.nan):.4f}  >= {floor}  {'ok' if agree else 'DISAGREE'}", agree


def summarize_encode(data: dict) -> list[tuple[str, bool | None]]:
    lines = []
    for s in data.get("summary", []):
        if "speedup" in s:  # a run of only some methods (--methods) has no packed-vs-reference ratio
            lines.append(_line(f"encode {s['shape']} packed vs reference", s.get("speedup"), s.get("target")))
            lines.append(_agreement(f"encode {s['shape']}", s, 0.99))
        # each other path against bf16 packed (the FP8 target is in the JSON; fused paths have none)
        for key, label, floor in (("fp8", "fp8", 0.95), ("fused", "fused", 0.99), ("fused_graphs", "fused + CUDA graphs", 0.99)):
            if key in s:
                versus = s[key]
                lines.append(_line(f"encode {s['shape']} {label} vs bf16 packed", versus.get("speedup_vs_packed"), versus.get("target")))
                lines.append(_agreement(f"encode {s['shape']} {label}", versus, floor))
        for method, note in s.get("notes", {}).items():
            lines.append((f"  encode {s['shape']} {method}: {note}", None))
    shapes = {s["shape"] for s in data.get("summary", [])}
    rows = [r for r in data.get("results", []) if r["shape"] in shapes]
    for r in rows:  # model FLOPs utilisation of each path
        if r.get("mfu") is not None:
            label = f"encode {r['shape']} {r['method']} model FLOPs / {r.get('precision', 'gemm')} ceiling"
            lines.append((f"  {label:<48} {100 * r['mfu']:6.1f}%  (no target)", None))
    lines += _judge_mfu(rows, data.get("mfu_targets", {}))
    return lines


def _judge_mfu(rows: list[dict], targets: dict) -> list[tuple[str, bool | None]]:
    """Issue 19: the fastest bf16 packed path of each shape against its share of the bf16 ceiling."""
    lines = []
    for shape, target in targets.items():
        bf16 = [r for r in rows if r["shape"] == shape and r["method"].startswith("packed") and r.get("precision") != "fp8_rowwise"]
        bf16 = [r for r in bf16 if r.get("mfu") is not None and not math.isnan(r["mfu"])]
        if not bf16:
            continue
        best = max(bf16, key=lambda r: r["mfu"])
        ok = best["mfu"] >= target
        label = f"encode {shape} best bf16 MFU ({best['method']})"
        lines.append((f"  {label:<48} {100 * best['mfu']:6.1f}%  target >= {100 * target:.0f}%  {'ok' if ok else 'MISSED'}", ok))
    return lines


def _attention_target(shape: str, key: str):
    if key == "fwd_vs_cudnn":  # only at fixed lengths L >= 2k
        length = shape[2:] if shape.startswith("L=") else ""
        return ATTENTION_TARGETS[key] if length.isdigit() and int(length) >= CUDNN_TARGET_MIN_LENGTH else None
    return ATTENTION_TARGETS[key]


def summarize_attention(data: dict) -> list[tuple[str, bool | None]]:
    return [
        _line(f"attention {r['shape']} {key}", r.get(key), _attention_target(r["shape"], key))
        for r in data.get("ratios", [])
        for key in ATTENTION_TARGETS
    ]


def summarize_pooling(data: dict) -> list[tuple[str, bool | None]]:
    rows = data.get("results", [])
    lines = []
    for r in rows:
        if r.get("method") != "triton":
            continue
        layout = r["layout"].split()[0]
        ref = next((x for x in rows if x["layout"] == r["layout"] and x["mode"] == r["mode"] and x["method"] == "torch-ref"), None)
        vs_ref = ref["fwd_ms"] / r["fwd_ms"] if ref and ref.get("fwd_ms") and r.get("fwd_ms") else None
        if r["mode"] in ONE_ROW_MODES:
            gather = next(
                (x for x in rows if x["layout"] == r["layout"] and x["mode"] == r["mode"] and x["method"] == "torch-gather"), None
            )
            vs_gather = gather["fwd_ms"] / r["fwd_ms"] if gather and gather.get("fwd_ms") and r.get("fwd_ms") else None
            lines.append(_line(f"pooling {layout} {r['mode']} fwd_vs_torch_gather", vs_gather, None))
            if r.get("fwd_ms"):
                lines.append(
                    (
                        f"  {'pooling ' + layout + ' ' + r['mode'] + ' fwd time':<48} {1000 * r['fwd_ms']:6.1f} us  (one row per sequence: no bandwidth target)",
                        None,
                    )
                )
        else:
            lines.append(_line(f"pooling {layout} {r['mode']} fwd_vs_copy", r.get("fwd_vs_copy"), POOLING_TARGETS["fwd_vs_copy"]))
        lines.append(_line(f"pooling {layout} {r['mode']} fwd_vs_torch_ref", vs_ref, POOLING_TARGETS["fwd_vs_torch_ref"]))
    return lines


#: Issue 10: MNTP and SimCSE steps >= 1.5x plain HF tokens/s at <= 0.6x its peak memory (GPU only).
TRAIN_SPEEDUP_TARGET, TRAIN_MEMORY_TARGET = 1.5, 0.6


def summarize_train(data: dict) -> list[tuple[str, bool | None]]:
    on_gpu = not str(data.get("device", "cpu")).startswith("cpu")
    lines = []
    for stage, s in data.get("summary", {}).items():
        lines.append(_line(f"train {stage} tokens/s vs plain HF", s.get("speedup_tokens_per_s"), TRAIN_SPEEDUP_TARGET if on_gpu else None))
        ratio = s.get("peak_mem_ratio")
        if ratio is None:
            lines.append((f"  {'train ' + stage + ' peak memory vs plain HF':<48} n/a", None))
        elif not on_gpu:
            lines.append((f"  {'train ' + stage + ' peak memory vs plain HF':<48} {ratio:6.2f}x  (no target)", None))
        else:
            ok = ratio <= TRAIN_MEMORY_TARGET
            lines.append(
                (
                    f"  {'train ' + stage + ' peak memory vs plain HF':<48} {ratio:6.2f}x  target <= "
                    f"{TRAIN_MEMORY_TARGET:.1f}x  {'ok' if ok else 'MISSED'}",
                    ok,
                )
            )
    for case in data.get("cases", []):
        if "error" in case:
            lines.append((f"  train {case.get('stage')} {case.get('impl')}: ERROR {case['error'].strip().splitlines()[-1][:120]}", False))
    return lines


def summarize_onnx_cuda(data: dict) -> list[tuple[str, bool | None]]:
    """Issue 19 item 5: ONNX Runtime's CUDA provider (fp16 export) vs torch, or why it was skipped."""
    if "skipped" in data:
        return [(f"  onnx-cuda skipped: {data['skipped']}", None)]
    s = data.get("summary", {})
    return [
        _line(f"onnx-cuda {data.get('shape')} fp16 vs torch packed tokens/s", s.get("onnx_vs_torch_tokens_per_s"), None),
        _agreement(f"onnx-cuda {data.get('shape')}", s, 0.99),
    ]


def summarize_fp8_load(data: dict) -> list[tuple[str, bool | None]]:
    """Seconds of an FP8 load (``bench_fp8_load.py``): reported, no target."""
    return [
        (f"  {'fp8 load ' + data['shape'] + ' ' + name:<48} {v['seconds']:6.1f} s  ({v['fp8_linears']}/{v['linears']} linears FP8)", None)
        for name, v in data.get("variants", {}).items()
    ]


SECTIONS = {
    "attention": summarize_attention,
    "pooling": summarize_pooling,
    "encode": summarize_encode,
    "fp8-encode": summarize_encode,  # bench_encode.py --methods packed packed-fp8 --name fp8-encode
    "fused-encode": summarize_encode,  # --methods packed packed-fused packed-fused-graphs --name fused-encode
    "fp8-fused-encode": summarize_encode,  # gpu_followup.sh: FP8 of the fused model vs plain bf16 packed
    "train": summarize_train,
    "onnx-cuda": summarize_onnx_cuda,
    "fp8-load": summarize_fp8_load,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    missed = False
    for name, summarize in SECTIONS.items():
        files = sorted(args.results_dir.glob(f"{name}-*.json"))
        if not files:
            print(f"{name}: no results in {args.results_dir}")
        for path in files:
            data = json.loads(path.read_text())
            card = data.get("environment", {}).get("card") or data.get("device", "?")
            print(f"{name} ({path.name}, {card}):")
            for text, ok in summarize(data):
                print(text)
                missed |= ok is False
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
