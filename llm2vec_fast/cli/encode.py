"""``llm2vec-fast encode``: embed texts from arguments, a file or stdin into .npy or .jsonl."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .common import add_model_options, load_encoder


def add_parser(sub) -> None:
    p = sub.add_parser("encode", help="embed texts", description="Embed texts (arguments, --input FILE, or stdin; one text per line).")
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--input", "-i", type=Path, help="file with one text per line ('-' for stdin)")
    p.add_argument("--output", "-o", type=Path, help="output file: .npy or .jsonl (default: JSON lines on stdout)")
    p.add_argument("--instruction", default="", help="instruction prepended to every text (attended to, not pooled)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--progress", action="store_true", help="always show a progress bar")
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
    return texts


def run(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.suffix not in (".npy", ".jsonl"):
        raise ValueError(f"--output must end in .npy or .jsonl, got {str(args.output)!r}")
    texts = read_texts(args)
    encoder = load_encoder(args)
    inputs = [[args.instruction, t] for t in texts] if args.instruction else texts
    emb = encoder.encode(
        inputs,
        batch_size=args.batch_size,
        show_progress_bar=True if args.progress else None,
        convert_to_numpy=True,
        normalize_embeddings=args.normalize,
    )
    if args.output is not None and args.output.suffix == ".npy":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.output, emb.astype(np.float32))
    else:
        lines = (json.dumps({"id": i, "text": t, "embedding": v.tolist()}) for i, (t, v) in enumerate(zip(texts, emb)))
        if args.output is None:
            for line in lines:
                print(line)
        else:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if args.output is not None:
        print(f"wrote {len(texts)} embeddings of dimension {emb.shape[1]} to {args.output}", file=sys.stderr)
    return 0
