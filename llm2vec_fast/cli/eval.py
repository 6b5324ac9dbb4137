"""``llm2vec-fast eval sts --split dev [--model ... --peft ...]``: STS-B Spearman x 100."""

from __future__ import annotations

import argparse

from .common import add_model_options, load_encoder


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an encoder (STS-B)")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    sts = tasks.add_parser("sts", help="STS Benchmark: Spearman x 100 of cosine similarities")
    sts.add_argument("--split", choices=("train", "dev", "test"), default="dev")
    sts.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    sts.add_argument("--data-dir", default=None, help="STS-B folder (default: $LLM2VEC_FAST_STSB_DIR or ../shared/data/stsbenchmark)")
    sts.add_argument("--batch-size", type=int, default=32)
    add_model_options(sts)
    sts.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..stsb import load_stsb, stsb_spearman

    load_stsb(args.split, args.data_dir)  # a missing file fails before the model loads
    encoder = load_encoder(args)
    score = stsb_spearman(encoder, args.split, limit=args.limit, data_dir=args.data_dir, batch_size=args.batch_size)
    print(f"STS-B {args.split} Spearman x100: {score:.2f}")
    return 0
