"""``llm2vec-fast export``: write an encoder as a validated ONNX folder (fp32, fp16, int8, int4, int8-openvino)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    from ..export.precisions import PRECISIONS

    p = sub.add_parser(
        "export",
        help="export an encoder to ONNX",
        description="Export an encoder to a self-contained ONNX folder (model, tokenizer, llm2vec_config.json, "
        "export_report.json), validated against the torch encoder.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder (default: the default encoder, SmolLM2-135M-Instruct with LLM2Vec adapters; default-base: the untrained base)",
    )
    p.add_argument(
        "--peft", action="append", default=None, metavar="ADAPTER", help="LoRA adapter folder (repeat to chain); merged before export"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, fp16 (GPU), int8 (CPU, ONNX Runtime), int4 (weight-only) or int8-openvino (CPU, OpenVINO: int8 in every layer but the most sensitive)",
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--no-validate", action="store_true", help="skip the comparison with the torch encoder")
    p.add_argument("--stsb-pairs", type=int, default=200, help="STS-B dev pairs scored during validation (0 = skip)")
    p.add_argument(
        "--int8-weights",
        choices=("7bit", "auto", "8bit"),
        default=None,
        help=(
            "int8 weights (default: 7bit for int8, right on every CPU; auto for int8-openvino, which is 8bit on "
            "every CPU); int8 with 8bit needs VNNI or AMX where it runs; for int8, auto = 8bit if this CPU has them"
        ),
    )
    p.add_argument(
        "--int8-rounding",
        choices=("nearest", "gptq"),
        default=None,
        help=(
            "int8 weight rounding (default: nearest for int8, gptq for int8-openvino; gptq: error-compensating, "
            "calibrated on the calibration inputs)"
        ),
    )
    p.add_argument(
        "--int8-smooth",
        type=_smoothing,
        default="auto",
        metavar="ALPHA",
        help="SmoothQuant alpha folded into the weights before int8 (default auto: 0.5 on Llama, Mistral, Qwen2, Qwen3; 0 = off)",
    )
    p.add_argument(
        "--openvino-group-size",
        type=int,
        choices=(16, 32, 64, 128),  # openvino_runtime.ACTIVATION_GROUP_SIZES (openvino is optional)
        default=None,
        help="int8-openvino: channels per activation scale in OpenVINO's run-time quantization (default 64; 32 is more faithful and slower)",
    )
    p.add_argument(
        "--int8-fp32-layers",
        type=int,
        default=None,
        metavar="N",
        help="int8-openvino: keep the N most sensitive decoder layers (torch simulation of the scheme) in fp32 from the start (default 1)",
    )
    p.add_argument(
        "--no-int8-fallback",
        action="store_true",
        help="fail at once when the int8 graph misses validation (default: put its most sensitive int8 layers back in fp32 and validate again)",
    )
    p.add_argument(
        "--format",
        choices=("onnx", "sentence-transformers"),
        default="onnx",
        help="onnx (default), or a folder for SentenceTransformer(path, trust_remote_code=True)",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE.json",
        help="sentence-transformers format: JSON object of prompt name -> instruction",
    )
    p.set_defaults(run=run)


def _smoothing(value: str) -> str | float:
    if value == "auto":
        return value
    try:
        alpha = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an alpha in [0, 1), got {value!r}") from None
    if not 0 <= alpha < 1:
        raise argparse.ArgumentTypeError(f"expected an alpha in [0, 1) (0 = off), got {value}")
    return alpha


def run(args: argparse.Namespace) -> int:
    from ..encoder import LLM2Vec
    from ..export import Int8Options, ValidationConfig, export_onnx

    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"output folder {str(args.output)!r} is not empty; pass --overwrite")
    if args.format == "sentence-transformers":
        return _save_sentence_transformers(args)
    if args.prompts is not None:
        raise ValueError("--prompts applies to --format sentence-transformers only")
    print("[export] loading the encoder" + (f" with adapters {args.peft} (merged)" if args.peft else ""), file=sys.stderr, flush=True)
    encoder = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft, merge_peft=True, dtype="float32", device="cpu")
    validate = False if args.no_validate else ValidationConfig(stsb_pairs=args.stsb_pairs)
    out = export_onnx(
        encoder,
        args.output,
        precision=args.precision,
        opset=args.opset,
        validate=validate,
        overwrite=args.overwrite,
        progress=True,
        int8=Int8Options(
            weights=args.int8_weights,
            rounding=args.int8_rounding,
            validation_fallback=not args.no_int8_fallback,
            smoothing=args.int8_smooth,
            activation_group_size=args.openvino_group_size,
            fp32_layers=args.int8_fp32_layers,
        ),
    )
    report = json.loads((out / "export_report.json").read_text())
    summary = {k: report.get(k) for k in ("precision", "status", "file_size_bytes", "min_cos", "mean_cos", "max_abs_err")}
    print(json.dumps(summary), file=sys.stderr)
    print(out)
    return 0


def _save_sentence_transformers(args: argparse.Namespace) -> int:
    from ..encoder import LLM2Vec

    prompts = None
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(f"--prompts file {str(args.prompts)!r} does not exist")
        prompts = json.loads(args.prompts.read_text(encoding="utf-8"))
        if not isinstance(prompts, dict):
            raise ValueError("--prompts must hold a JSON object of prompt name -> instruction")
    encoder = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft, merge_peft=True, dtype="float32", device="cpu")
    encoder.save(args.output, format="sentence-transformers", prompts=prompts)
    print(f"load it with SentenceTransformer({str(args.output)!r}, trust_remote_code=True)", file=sys.stderr)
    print(args.output)
    return 0
