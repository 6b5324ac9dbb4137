"""Which int8 lever removes which error: the export's int8 scheme simulated in torch on *all*
decoder layers (``Int8Simulator``), one lever at a time, scored against torch fp32 on held-out text.

Rows: bf16 (the bar: int8 must be at least as faithful), per-token int8 activations alone,
weights alone and both, with 7-bit and 8-bit weights, rounded to nearest or by GPTQ
(sequential, act-order; and one-pass from fp32 inputs); then the same after SmoothQuant
(``export/smoothing.py``, ``--smoothing`` alpha). Columns: mean / worst cosine to fp32 on
STS-B *dev* sentences (calibration reads *train*) and on ``[instruction, text]`` pairs. Accuracy
only, no timing: any machine will do.

    python benchmarks/int8_levers.py                                  # the default (trained) encoder
    python benchmarks/int8_levers.py --model default-base             # the untrained base
    python benchmarks/int8_levers.py --peft MNTP --peft SIMCSE        # a trained encoder
    python benchmarks/int8_levers.py --quick                          # fewer texts and rows

Writes ``benchmarks/results/int8-levers-trained.json`` (a trained encoder) or ``int8-levers.json`` (or ``--output``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path (tests)
from common import model_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INSTRUCTIONS = ("Retrieve semantically similar text:", "Given a question, retrieve passages that answer it")


def held_out_texts(n: int) -> tuple[list[str], list[list[str]]]:
    from llm2vec_fast.stsb import load_stsb

    dev = load_stsb("dev")[200:]  # as bench_onnx: after the pairs export validation scores
    texts = list(dict.fromkeys(s for a, b, _ in dev for s in (a, b)))[:n]
    pairs = [[INSTRUCTIONS[i % len(INSTRUCTIONS)], s] for i, s in enumerate(texts[: n // 2])]
    return texts, pairs


def score(embed, reference: dict) -> dict:
    from llm2vec_fast.export.calibrate import cosine_rows

    out = {}
    for kind, (inputs, ref) in reference.items():
        c = cosine_rows(embed(inputs), ref)
        out[kind] = {"mean_cos": round(float(c.mean()), 6), "min_cos": round(float(c.min()), 6)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="checkpoint folder (default: the default encoder, trained; default-base: the untrained base)"
    )
    parser.add_argument("--peft", action="append", default=None, metavar="ADAPTER", help="LoRA adapter (repeat to chain; merged)")
    parser.add_argument("--texts", type=int, default=512, help="held-out STS-B dev sentences (half of them also as pairs)")
    parser.add_argument("--calibration", type=int, default=96, help="STS-B train calibration inputs (as the export)")
    parser.add_argument("--quick", action="store_true", help="128 texts, the main rows only")
    parser.add_argument("--bits", default="7,8", help="weight bits to try (comma-separated: 7, 8)")
    parser.add_argument("--smoothing", type=float, default=0.5, help="SmoothQuant alpha of the smoothed rows (0: no such rows)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch
    from llm2vec_fast.export.calibrate import Int8Simulator, bf16_copy, calibration_inputs
    from llm2vec_fast.export.cpu_int8 import WEIGHT_LEVELS, cpu_flags, cpu_name
    from llm2vec_fast.export.gptq import gptq_decoder_weights

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.default_model import is_default_encoder

    if args.quick:
        args.texts = 128
    encoder = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft, merge_peft=True, dtype="float32", device="cpu")
    texts, pairs = held_out_texts(args.texts)
    calibration = calibration_inputs(args.calibration)
    base = Int8Simulator(encoder)
    everything = set(base.modules)
    reference = {"plain": (texts, base.embed(set(), texts)), "instructions": (pairs, base.embed(set(), pairs))}
    rows = []

    def add(name: str, embed, seconds: float = 0.0) -> None:
        start = time.perf_counter()
        row = {"config": name, **score(embed, reference), "seconds": round(seconds + time.perf_counter() - start, 1)}
        rows.append(row)
        p, i = row["plain"], row["instructions"]
        print(f"{name:55s} plain {p['mean_cos']:.4f}/{p['min_cos']:.4f}  instr {i['mean_cos']:.4f}/{i['min_cos']:.4f}", flush=True)

    bf16 = bf16_copy(encoder)
    add("bf16 (torch)", lambda x: np.asarray(bf16.encode(x, convert_to_numpy=True, show_progress_bar=False)))
    add("int8 activations (per token) only", lambda x: base.embed(everything, x, weights=False))
    bit_choices = [int(b) for b in args.bits.split(",")]
    if not set(bit_choices) <= set(WEIGHT_LEVELS):
        raise SystemExit(f"--bits takes 7 and/or 8, got {args.bits!r}")
    variants = [(bits, rounding, seq) for bits in bit_choices for rounding, seq in (("nearest", True), ("gptq", True), ("gptq", False))]
    if args.quick:
        variants = [(bits, rounding, True) for bits in bit_choices for rounding in ("nearest", "gptq")]
    for bits, rounding, sequential in variants:
        start = time.perf_counter()
        weights = None
        if rounding == "gptq":
            weights = gptq_decoder_weights(encoder, calibration, WEIGHT_LEVELS[bits], sequential=sequential)
        sim = Int8Simulator(encoder, weight_levels=WEIGHT_LEVELS[bits], weights=weights)
        label = f"{bits}-bit weights, {rounding}" + ("" if rounding == "nearest" else (", sequential" if sequential else ", one pass"))
        add(f"{label}: weights only", lambda x, s=sim: s.embed(everything, x, activations=False), time.perf_counter() - start)
        add(f"{label}: weights + activations", lambda x, s=sim: s.embed(everything, x))
    if args.smoothing:
        from llm2vec_fast.export.smoothing import smoothed_copy

        start = time.perf_counter()
        smoothed = smoothed_copy(encoder, calibration, args.smoothing)
        seconds = time.perf_counter() - start
        tag = f"SmoothQuant {args.smoothing}"
        sim = Int8Simulator(smoothed)
        add(f"{tag}: int8 activations (per token) only", lambda x, s=sim: s.embed(everything, x, weights=False), seconds)
        for bits, rounding in [(b, r) for b in bit_choices for r in ("nearest", "gptq")]:
            start = time.perf_counter()
            weights = None
            if rounding == "gptq":
                weights = gptq_decoder_weights(smoothed, calibration, WEIGHT_LEVELS[bits], sequential=False)
            sim = Int8Simulator(smoothed, weight_levels=WEIGHT_LEVELS[bits], weights=weights)
            label = f"{tag}, {bits}-bit weights, {rounding}" + ("" if rounding == "nearest" else ", one pass")
            add(f"{label}: weights + activations", lambda x, s=sim: s.embed(everything, x), time.perf_counter() - start)
    result = {
        "model": model_description(args.model, args.peft),
        "layers_int8": len(base.layers),
        "held_out": {"plain": len(texts), "instructions": len(pairs), "source": "STS-B dev sentences after the first 200 pairs"},
        "calibration_inputs": len(calibration),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    out = args.output or RESULTS / ("int8-levers-trained.json" if args.peft or is_default_encoder(args.model) else "int8-levers.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_table(result))
    return 0


def render_table(result: dict) -> str:
    lines = [
        f"{result['model']}: all {result['layers_int8']} decoder layers simulated in int8; cosine to fp32 on "
        f"{result['held_out']['plain']} held-out STS-B dev sentences / {result['held_out']['instructions']} "
        f"[instruction, text] pairs; GPTQ on {result['calibration_inputs']} STS-B train inputs.",
        "",
        *cosine_table(result["rows"], "configuration", "config"),
    ]
    return "\n".join(lines)


def cosine_table(rows: list[dict], heading: str, key: str) -> list[str]:
    """Markdown lines: per row, ``row[key]`` and its mean / worst cosine on plain text and on
    instruction pairs (``row["plain"]``, ``row["instructions"]``)."""
    lines = [f"| {heading} | mean cos | worst cos | mean cos (instr.) | worst cos (instr.) |", "|---|---|---|---|---|"]
    for r in rows:
        p, i = r["plain"], r["instructions"]
        lines.append(f"| {r[key]} | {p['mean_cos']:.4f} | {p['min_cos']:.4f} | {i['mean_cos']:.4f} | {i['min_cos']:.4f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
