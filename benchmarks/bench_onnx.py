"""CPU benchmark of the ONNX exports against the torch fp32 encoder (default model).

For torch fp32 and each ONNX precision: sentences/s (2 threads, batch 32, interleaved rounds,
best round kept), mean / min cosine to torch fp32, STS-B dev Spearman, size on disk.

    OMP_NUM_THREADS=2 python benchmarks/bench_onnx.py [--sentences 320] [--stsb-pairs 500]

Writes ``benchmarks/results/onnx-cpu.json`` and ``onnx-cpu.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def export_seconds(folder: Path) -> float | None:
    """Export + conversion time recorded in the folder's export_report.json."""
    try:
        report = json.loads((folder / "export_report.json").read_text())
    except (OSError, ValueError):
        return None
    return round(report.get("export_s", 0) + report.get("convert_s", 0), 1)


def timed_encode(encoder, texts, batch_size) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = np.asarray(encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True))
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=320, help="STS-B dev sentences for speed and cosine")
    parser.add_argument("--stsb-pairs", type=int, default=500, help="STS-B dev pairs for Spearman")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--export-dir", type=Path, default=None, help="reuse / keep exports here")
    parser.add_argument("--output", type=Path, default=RESULTS / "onnx-cpu.json")
    args = parser.parse_args()

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.export import PRECISIONS, OnnxEncoder, ValidationConfig, export_onnx
    from llm2vec_fast.export.calibrate import cosine_rows
    from llm2vec_fast.stsb import load_stsb, stsb_spearman

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch_encoder = LLM2Vec.from_pretrained(device="cpu", dtype="float32")
    # transformers' SDPA attention (the default) is ~5x slower than eager on this CPU build of
    # torch 2.13 for short batches, so eager is measured too, as the fairer torch baseline
    eager_encoder = LLM2Vec.from_pretrained(device="cpu", dtype="float32", attn_implementation="eager")
    texts = list(dict.fromkeys(s for a, b, _ in load_stsb("dev") for s in (a, b)))[: args.sentences]

    export_root = args.export_dir or Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    engines = {"torch-fp32": torch_encoder, "torch-fp32-eager": eager_encoder}
    for p in PRECISIONS:
        folder = export_root / p
        if not (folder / "model.onnx").is_file():
            export_onnx(torch_encoder, folder, precision=p, validate=ValidationConfig(stsb_pairs=0), overwrite=True)
        engines[f"onnx-{p}"] = OnnxEncoder.from_pretrained(folder, num_threads=args.threads)

    for enc in engines.values():  # warm-up
        enc.encode(texts[:64], batch_size=args.batch_size)
    best = {name: float("inf") for name in engines}
    outputs = {}
    for _ in range(args.rounds):  # interleaved, so load from other processes hits every engine alike
        for name, enc in engines.items():
            seconds, outputs[name] = timed_encode(enc, texts, args.batch_size)
            best[name] = min(best[name], seconds)

    ref = outputs["torch-fp32"]
    fp32_bytes = None
    rows = []
    for name, enc in engines.items():
        cos = cosine_rows(outputs[name], ref)
        precision = name.split("-", 1)[1]
        if name.startswith("torch"):
            size = None
        else:
            folder = export_root / precision
            size = sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data") if (folder / f).exists())
            fp32_bytes = size if precision == "fp32" else fp32_bytes
        rows.append(
            {
                "engine": name,
                "sentences_per_s": round(len(texts) / best[name], 2),
                "speedup_vs_torch_fp32": round(best["torch-fp32"] / best[name], 2),
                "speedup_vs_torch_fp32_eager": round(best["torch-fp32-eager"] / best[name], 2),
                "mean_cos_to_torch_fp32": round(float(cos.mean()), 6),
                "min_cos_to_torch_fp32": round(float(cos.min()), 6),
                "stsb_dev_spearman": round(stsb_spearman(enc, "dev", args.stsb_pairs, batch_size=args.batch_size), 2),
                "size_mb": round(size / 1e6, 1) if size else None,
                "export_s": export_seconds(export_root / precision) if not name.startswith("torch") else None,
            }
        )
    for row in rows:
        if row["size_mb"] and fp32_bytes:
            row["size_vs_onnx_fp32"] = round(row["size_mb"] * 1e6 / fp32_bytes, 3)

    result = {
        "model": "SmolLM2-135M-Instruct (embedded default, bidirectional, mean pooling, no LLM2Vec training)",
        "cpu": cpu_name(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "sentences": len(texts),
        "stsb_pairs": args.stsb_pairs,
        "rounds": args.rounds,
        "timing": "best of interleaved rounds",
        "note": "machine shared with other engineers' jobs while measuring: absolute numbers are noisy, ratios less so",
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.output.with_suffix(".png"), result)
    print(json.dumps(rows, indent=2))


def plot(rows, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bars = axes[0].bar(names, [r["sentences_per_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        axes[0].annotate(f"cos {r['mean_cos_to_torch_fp32']:.4f}\nmin {r['min_cos_to_torch_fp32']:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    axes[0].set_ylabel("sentences / s")
    axes[0].set_title(f"throughput, {meta['threads']} CPU threads, batch {meta['batch_size']}")
    sized = [r for r in rows if r["size_mb"]]
    axes[1].bar([r["engine"] for r in sized], [r["size_mb"] for r in sized], color="tab:orange")
    axes[1].set_ylabel("MB on disk")
    axes[1].set_title("model size")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.margins(y=0.2)
    fig.suptitle(f"{meta['model'].split(' (')[0]} on {meta['cpu']} (shared machine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
