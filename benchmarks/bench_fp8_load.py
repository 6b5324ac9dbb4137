"""What an FP8 load costs on top of the bf16 load: seconds of ``apply_fp8`` on the GPU, per way of loading.

Variants (a fresh random-weight model each, Llama-3.2-1B shapes by default, bf16 on the GPU):
  * ``nearest``      -- every layer FP8, weights rounded to nearest (``rounding="nearest"``): the
    row-wise scales and the cast only.
  * ``gptq``         -- every layer FP8, GPTQ-rounded weights (``rounding="gptq"``): the sequential
    Hessian pass over ``--gptq-inputs`` inputs and the rounding, on the GPU.
  * ``default``      -- what ``LLM2Vec.from_pretrained(..., quantization="fp8")`` runs: GPTQ, then
    the layer calibration that keeps the sensitive layers in bf16.

Inputs: synthetic sentences of 6-30 words, every third with an instruction (the timing depends on token counts, not on meaning; random
weights make the calibration's choice meaningless, its cost is what is measured), tokenized with
``--tokenizer`` (default: the default model's; the GPU suite carries one). One timed run per variant
after a warm-up ``nearest`` pass (CUDA context, cuBLAS); GPU peak memory above the bf16 model.

    python benchmarks/bench_fp8_load.py [--shape llama-8b] [--tokenizer DIR]
    python benchmarks/bench_fp8_load.py --cpu-smoke   # the simulated scheme on a tiny model: checks the script

Writes ``benchmarks/results/fp8-load-<card>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_encode import _sync  # noqa: E402
from bench_train import make_texts  # noqa: E402

VARIANTS = {
    "nearest": dict(rounding="nearest", high_precision_layers=[]),
    "gptq": dict(rounding="gptq", high_precision_layers=[]),
    "default": dict(rounding="gptq", high_precision_layers="calibrate"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, help="random shape (default llama-1b; tiny with --cpu-smoke)")
    p.add_argument("--gptq-inputs", type=int, default=None, help="GPTQ inputs (default: the library's GPTQ_INPUTS; 16 with --cpu-smoke)")
    p.add_argument(
        "--calibration-inputs", type=int, default=None, help="layer calibration inputs (default: the library's; 12 with --cpu-smoke)"
    )
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the default model's)")
    p.add_argument("--cpu-smoke", action="store_true", help="fp8-simulated on a tiny CPU model: checks the script, measures nothing")
    p.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    return p.parse_args(argv)


def time_variant(make_encoder, scheme: str, device: str, inputs: dict, **settings) -> dict:
    from llm2vec_fast.fp8 import apply_fp8
    from llm2vec_fast.fused_layers import keep_residual_in_fp32, wants_fp32_residual

    encoder = make_encoder()
    # the residual stream as from_pretrained(quantization=...) sets it before quantizing (calibration runs the model)
    dtype = encoder.model.get_input_embeddings().weight.dtype
    keep_residual_in_fp32(encoder.model, wants_fp32_residual(None, scheme, dtype, encoder.model))
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    report = apply_fp8(encoder, scheme, **inputs, **settings)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    kept = report["high_precision_layers"]
    return {
        "seconds": seconds,
        "gptq_seconds": report.get("gptq_seconds"),
        "fp8_linears": report["fp8_linears"],
        "linears": report["linears"],
        "high_precision_layers": kept,
        "peak_mem_gib_above_model": peak,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.default_model import default_model_path
    from llm2vec_fast.fp8 import GPTQ_INPUTS, fp8_unsupported_reason
    from llm2vec_fast.layer_sensitivity import CALIBRATION_INPUTS, with_instructions
    from llm2vec_fast.synthetic import random_model

    smoke = args.cpu_smoke
    if not smoke:
        common.require_cuda("bench_fp8_load.py (--cpu-smoke checks the script on CPU)")
        reason = fp8_unsupported_reason("cuda")  # a card without FP8 (sm_80) is not a failure: nothing to run
        if reason:
            print(f"bench_fp8_load.py: needs an FP8 GPU ({reason}); nothing to measure (--cpu-smoke checks the script).")
            return 0
    device, dtype, scheme = ("cpu", torch.float32, "fp8-simulated") if smoke else ("cuda", torch.bfloat16, "fp8")
    shape = args.shape or ("tiny" if smoke else "llama-1b")
    n_gptq = args.gptq_inputs or (16 if smoke else GPTQ_INPUTS)
    n_calibration = args.calibration_inputs or (12 if smoke else CALIBRATION_INPUTS)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_path())
    inputs = {  # every third with an instruction, as the library's own calibration inputs
        "gptq_inputs": with_instructions(make_texts(n_gptq, 6, 30, seed=0)),
        "calibration_inputs": with_instructions(make_texts(n_calibration, 6, 30, seed=1)),
    }

    def make_encoder():
        model = random_model(shape, device, dtype)
        if model.config.vocab_size < len(tokenizer):  # the tiny smoke shape: room for every token id
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        return LLM2Vec(model, tokenizer, packed=True if device == "cuda" else None).eval()

    time_variant(make_encoder, scheme, device, inputs, **VARIANTS["nearest"])  # warm-up
    runs = {}
    for name in args.variants:
        runs[name] = time_variant(make_encoder, scheme, device, inputs, **VARIANTS[name])
        print(f"{name}: {runs[name]['seconds']:.1f} s, {runs[name]['fp8_linears']} of {runs[name]['linears']} linears in FP8", flush=True)
    payload = {
        "shape": shape,
        "scheme": scheme,
        "gptq_inputs": n_gptq,
        "calibration_inputs": n_calibration,
        "inputs": "synthetic sentences of 6-30 words, every third with an instruction",
        "variants": runs,
    }
    path = common.write_json("fp8-load", payload, args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
