"""Options shared by several subcommands."""

from __future__ import annotations

import argparse

from ..encoding import POOLING_MODES
from ..fp8 import QUANTIZATIONS, ROUNDINGS


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint folder (default: the default encoder, SmolLM2-135M-Instruct with LLM2Vec adapters; default-base: the untrained base)",
    )
    parser.add_argument("--peft", action="append", default=None, metavar="ADAPTER", help="LoRA adapter folder (repeat to chain)")
    parser.add_argument(
        "--pooling", choices=POOLING_MODES, default=None, help="pooling mode (default: from llm2vec_config.json, else mean)"
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="max tokens per input, instruction and wrapping included (default 512)"
    )
    parser.add_argument(
        "--doc-max-length",
        type=int,
        default=None,
        help="max tokens of the text itself, trimmed by dropping its last words as the official llm2vec does (default 400)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--no-bidirectional", action="store_true", help="keep the causal mask (plain decoder)")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="fp8: the decoder's linear layers as FP8 W8A8 GEMMs (CUDA GPUs of compute capability 8.9+), layers that "
        "calibration finds sensitive kept in high precision; fp8-simulated: the same GEMM numerics on any device (slow; "
        "for fidelity checks; with --dtype bfloat16 the rest of the model runs as on a GPU)",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="fused decoder layers (Llama, Mistral, Qwen2, Qwen3, Gemma): fused residual-add + RMSNorm, Liger-Kernel RoPE and SwiGLU "
        "on CUDA, stacked QKV and gate/up GEMMs (needs liger-kernel on the GPU; adapters are merged)",
    )
    parser.add_argument(
        "--residual-fp32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the residual stream in float32 under a bf16/fp16 model, the GEMMs in 16 bits or FP8 (default: on with "
        "--quantization, where it keeps FP8's worst case within bf16's; off otherwise)",
    )
    parser.add_argument(
        "--high-precision-layers",
        type=_layer_indices,
        default="calibrate",
        metavar="I,J,...",
        help='with --quantization: decoder layers kept in high precision ("" for none; default: chosen by calibration at load)',
    )
    parser.add_argument(
        "--fp8-rounding",
        choices=ROUNDINGS,
        default="gptq",
        help="with --quantization: FP8 weights rounded by GPTQ on STS-B train text (closer to bf16; a calibration pass at load) "
        "or to the nearest e4m3 value",
    )


def _layer_indices(value: str):
    if value == "calibrate":
        return value
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated decoder layer indices, got {value!r}") from None


def encoder_kwargs(args: argparse.Namespace) -> dict:
    """``LLM2Vec.from_pretrained`` keyword arguments (all but the model path) from the model options."""
    return dict(
        peft_model_name_or_path=args.peft,
        pooling_mode=args.pooling,
        max_length=args.max_length,
        doc_max_length=args.doc_max_length,
        enable_bidirectional=not args.no_bidirectional,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        high_precision_layers=args.high_precision_layers,
        fp8_rounding=args.fp8_rounding,
        fused=args.fused,
        residual_in_fp32=args.residual_fp32,
    )


def load_encoder(args: argparse.Namespace):
    from ..encoder import LLM2Vec

    return LLM2Vec.from_pretrained(args.model, **encoder_kwargs(args))
