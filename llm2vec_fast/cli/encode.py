"""``llm2vec-fast encode``: embed texts from arguments, a file or stdin into .npy or .jsonl."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..quantization import PRECISIONS, SCALAR_PRECISIONS
from .common import add_model_options, load_encoder


def add_output_options(p) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="output precision (as sentence-transformers' quantize_embeddings; binary packs 8 dims per byte)",
    )
    p.add_argument(
        "--truncate-dim", type=int, default=None, metavar="D", help="keep the first D dimensions (Matryoshka), before --normalize"
    )
    p.add_argument(
        "--ranges", type=Path, default=None, metavar="FILE.npy", help="int8/uint8: per-dimension [min; max] ranges saved by --save-ranges"
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="FILE",
        help="int8/uint8: texts (one per line) whose embeddings set the ranges (default: the encoded texts themselves)",
    )
    p.add_argument(
        "--save-ranges", type=Path, default=None, metavar="FILE.npy", help="int8/uint8: write the ranges used, for later --ranges"
    )


def add_parser(sub) -> None:
    p = sub.add_parser("encode", help="embed texts", description="Embed texts (arguments, --input FILE, or stdin; one text per line).")
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--input", "-i", type=Path, help="file with one text per line ('-' for stdin)")
    p.add_argument("--output", "-o", type=Path, help="output file: .npy or .jsonl (default: JSON lines on stdout)")
    p.add_argument("--instruction", default="", help="instruction prepended to every text (attended to, not pooled)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--progress", action="store_true", help="always show a progress bar")
    add_output_options(p)
    add_model_options(p)
    p.set_defaults(run=run)


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts and args.input:
        raise ValueError("give texts as arguments or with --input, not both")
    if args.texts:
        return list(args.texts)
    if args.input and str(args.input) != "-":
        if not args.input.is_file():
            raise FileNotFoundError(f"input file {str(args.input)!r} does not exist")
        lines = args.input.read_text(encoding="utf-8").splitlines()
    elif args.input or not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    else:
        raise ValueError("no texts: pass them as arguments, with --input FILE, or on stdin")
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError("the input holds no non-empty line")
    if len(texts) < len(lines):
        print(f"skipped {len(lines) - len(texts)} blank line(s): output rows follow the non-blank lines", file=sys.stderr)
    return texts


def _check_output_options(args: argparse.Namespace) -> None:
    scalar = args.precision in SCALAR_PRECISIONS
    for flag, value in (("--ranges", args.ranges), ("--calibration", args.calibration), ("--save-ranges", args.save_ranges)):
        if value is not None and not scalar:
            raise ValueError(f"{flag} applies to --precision int8 or uint8 only")
    if args.ranges is not None and args.calibration is not None:
        raise ValueError("give --ranges or --calibration, not both")
    for flag, path in (("--ranges", args.ranges), ("--calibration", args.calibration)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag} file {str(path)!r} does not exist")
    if args.calibration is not None and len(read_lines(args.calibration)) < 2:  # before any encoding
        raise ValueError(f"the --calibration file {str(args.calibration)!r} holds fewer than two non-empty lines; ranges need two at least")


def encode_with_precision(encoder, inputs, args: argparse.Namespace) -> np.ndarray:
    """Embed ``inputs`` at ``--precision`` / ``--truncate-dim``; int8/uint8 ranges come from
    ``--ranges``, ``--calibration`` texts, or the inputs themselves (reported on stderr)."""
    from ..quantization import calibration_ranges, quantize_embeddings

    common = dict(batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=args.normalize, truncate_dim=args.truncate_dim)
    progress = True if args.progress else None
    if args.precision not in SCALAR_PRECISIONS:
        return encoder.encode(inputs, show_progress_bar=progress, precision=args.precision, **common)
    floats = encoder.encode(inputs, show_progress_bar=progress, **common)
    if args.ranges is not None:
        try:
            ranges, source = np.load(args.ranges, allow_pickle=False), f"--ranges {args.ranges}"
        except (ValueError, OSError) as err:
            raise ValueError(
                f"--ranges {str(args.ranges)!r} is not a .npy array of shape (2, D), as --save-ranges writes ({err})"
            ) from None
    else:
        calib_texts = read_lines(args.calibration) if args.calibration is not None else None
        if calib_texts is not None and args.instruction:
            calib_texts = [[args.instruction, t] for t in calib_texts]
        calib = floats if calib_texts is None else encoder.encode(calib_texts, show_progress_bar=progress, **common)
        if len(calib) < 2:
            raise ValueError(f"{args.precision} needs at least two embeddings to compute ranges: pass --ranges or --calibration")
        ranges = calibration_ranges(calib)
        source = f"{len(calib)} calibration texts from {args.calibration}" if calib_texts else f"the {len(calib)} encoded texts"
    print(f"{args.precision} ranges from {source}", file=sys.stderr)
    if args.save_ranges is not None:
        args.save_ranges.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_ranges, ranges)
        print(f"wrote {args.precision} ranges {ranges.shape} to {args.save_ranges}", file=sys.stderr)
    return quantize_embeddings(floats, args.precision, ranges=ranges)


def read_lines(path: Path) -> list[str]:
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{str(path)!r} holds no non-empty line")
    return texts


def run(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.suffix not in (".npy", ".jsonl"):
        raise ValueError(f"--output must end in .npy or .jsonl, got {str(args.output)!r}")
    _check_output_options(args)
    texts = read_texts(args)
    encoder = load_encoder(args)
    inputs = [[args.instruction, t] for t in texts] if args.instruction else texts
    emb = encode_with_precision(encoder, inputs, args)
    if args.output is not None and args.output.suffix == ".npy":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.output, emb)
    else:
        lines = (json.dumps({"id": i, "text": t, "embedding": v.tolist()}) for i, (t, v) in enumerate(zip(texts, emb)))
        if args.output is None:
            for line in lines:
                print(line)
        else:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if args.output is not None:
        size = f"{emb.shape[1]} bytes of packed bits" if args.precision in ("binary", "ubinary") else f"dimension {emb.shape[1]}"
        print(f"wrote {len(texts)} embeddings of {size} to {args.output}", file=sys.stderr)
    return 0
