"""ONNX Runtime's CUDA execution provider against torch on the same GPU: real tokens/s of the fp16 export.

Paths (same random-weight model, same inputs):
  * ``torch-packed`` -- ``LLM2Vec`` on CUDA in bf16, its default packed varlen path (the baseline).
  * ``onnx-cuda-fp16`` -- the ``export_onnx(..., precision="fp16")`` folder of the same weights, run by
    ``OnnxEncoder.from_pretrained(..., providers="cuda")`` (ONNX Runtime's CUDAExecutionProvider, IO
    binding, length-sorted padded batches).

Model: random weights with SmolLM2-135M shapes by default (``--shape llama-1b`` for Llama-3.2-1B;
``llm2vec_fast.synthetic``), drawn once in fp32 on the host: the export reads that copy and torch gets
the same weights in bf16 on the GPU. The saved folder needs a tokenizer (``--tokenizer``; default the
default model's): its vocabulary only has to hold the random ids, tokenisation is not timed.

What is timed: ``embed_items`` (``encode()`` after tokenisation: batching, padding or packing, host
to device copies, forward, pooling, the copy back), a full warm-up pass first, then ``--repeats``
passes; the median and the spread (min, max) are kept. Both paths must agree: min cosine >= 0.99
(fp16 against bf16 arithmetic); the baseline is sanity-checked by the same cosine.

Where ONNX Runtime has no CUDAExecutionProvider (the plain ``onnxruntime`` wheel, as on the GPU
image; ``onnxruntime-gpu`` is over 200 MB, more than a device call carries), nothing is exported or
timed: the JSON records why (``skipped``) and the GPU suite's summary prints it.

    python benchmarks/bench_onnx_cuda.py [--quick] [--shape llama-1b] [--tokenizer DIR]
    python benchmarks/bench_onnx_cuda.py --cpu-smoke   # CPU provider vs torch fp32, tiny model: checks the script

Writes ``benchmarks/results/onnx-cuda-<card>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_encode import agreement, time_path  # noqa: E402

MIN_COSINE = 0.99
DEFAULT_SHAPE = "smollm2-135m"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, help=f"random shape (default {DEFAULT_SHAPE}; tiny with --cpu-smoke)")
    p.add_argument("--num-texts", type=int, default=None, help="inputs (default 2048, 512 with --quick, 12 with --cpu-smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per path (default 5, 3 with --quick, 1 with --cpu-smoke)")
    p.add_argument("--batch-size", type=int, default=64, help="ONNX Runtime batch size (padded batches)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder saved with the model (default: the default model's)")
    p.add_argument("--quick", action="store_true", help="fewer inputs and passes (the GPU suite)")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="CPU provider vs torch fp32 on a tiny model: checks the script, measures nothing"
    )
    p.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--name", default="onnx-cuda", help="results file stem (default: onnx-cuda)")
    return p.parse_args(argv)


def cuda_provider_missing() -> str | None:
    """Why ONNX Runtime cannot run on the GPU here, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install llm2vec-fast[onnx-gpu])"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: {providers}); "
            "the GPU build is onnxruntime-gpu (pip install llm2vec-fast[onnx-gpu])"
        )
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def build_encoders(shape: str, tokenizer_dir: str, export_dir: Path, device: str, dtype: torch.dtype, providers: str):
    """The torch encoder on ``device`` and the ONNX fp16 encoder of the same random weights, and the export seconds."""
    from llm2vec_fast.export import OnnxEncoder, export_onnx
    from transformers import AutoTokenizer

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.synthetic import random_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = LLM2Vec(random_model(shape, "cpu", torch.float32), tokenizer).eval()
    start = time.perf_counter()
    export_onnx(encoder, export_dir, precision="fp16", validate=False)
    export_s = time.perf_counter() - start
    onnx_encoder = OnnxEncoder.from_pretrained(export_dir, providers=providers)
    encoder.model.to(device=device, dtype=dtype)
    return encoder, onnx_encoder, export_s


def measure(args) -> dict:
    from llm2vec_fast.default_model import default_model_path
    from llm2vec_fast.synthetic import random_config, random_items, sample_lengths

    smoke = args.cpu_smoke
    shape = args.shape or ("tiny" if smoke else DEFAULT_SHAPE)
    n_texts = args.num_texts or (12 if smoke else 512 if args.quick else 2048)
    repeats = args.repeats or (1 if smoke else 3 if args.quick else 5)
    device, dtype, providers = ("cpu", torch.float32, "cpu") if smoke else ("cuda", torch.bfloat16, "cuda")
    lengths = sample_lengths(n_texts, hi=64 if smoke else 512)
    items = random_items(lengths, random_config(shape).vocab_size)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-cuda-") as tmp:
        encoder, onnx_encoder, export_s = build_encoders(
            shape, args.tokenizer or str(default_model_path()), Path(tmp) / "fp16", device, dtype, providers
        )
        runs = {
            "torch-packed": time_path(encoder, items, args.batch_size, repeats, device),
            "onnx-cuda-fp16": time_path(onnx_encoder, items, args.batch_size, repeats, device),
        }
    tokens = sum(lengths)
    rows = []
    for method, run in runs.items():
        rows.append(
            {
                "method": method,
                "seconds": run["seconds"],
                "min_seconds": min(run["all_seconds"]),
                "max_seconds": max(run["all_seconds"]),
                "tokens_per_s": tokens / run["seconds"],
                "batches": run["batches"],
            }
        )
    fidelity = agreement(runs["torch-packed"]["out"], runs["onnx-cuda-fp16"]["out"], MIN_COSINE)
    return {
        "shape": shape,
        "inputs": n_texts,
        "tokens": tokens,
        "repeats": repeats,
        "batch_size": args.batch_size,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "export_s": export_s,
        "results": rows,
        "summary": {
            "onnx_vs_torch_tokens_per_s": runs["torch-packed"]["seconds"] / runs["onnx-cuda-fp16"]["seconds"],
            "spread": {r["method"]: [r["min_seconds"], r["max_seconds"]] for r in rows},
            **fidelity,
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = None if args.cpu_smoke else cuda_provider_missing()
    if reason:
        print(f"bench_onnx_cuda.py: skipped: {reason}")
        path = common.write_json(args.name, {"skipped": reason}, args.results_dir)
        print(f"wrote {path}")
        return 0
    payload = measure(args)
    common.print_table(payload["results"], ["method", "seconds", "min_seconds", "max_seconds", "tokens_per_s", "batches"], "{:.3f}")
    s = payload["summary"]
    print(f"ONNX Runtime fp16 vs torch: {s['onnx_vs_torch_tokens_per_s']:.2f}x tokens/s; cosine min {s['min_cosine']:.4f}")
    path = common.write_json(args.name, payload, args.results_dir)
    print(f"wrote {path}")
    if not s["agree"]:
        print(f"ERROR: ONNX Runtime and torch disagree (min cosine < {MIN_COSINE} or non-finite)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
