"""``llm2vec-fast demo``: embed a few built-in sentences and print their cosine-similarity matrix."""

from __future__ import annotations

import argparse
import time

from .common import add_model_options, load_encoder

EXAMPLES = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar.",
    "A woman is slicing an onion.",
    "A chef is chopping vegetables in the kitchen.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="encode built-in examples and print their cosine similarities")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    encoder = load_encoder(args)
    loaded = time.perf_counter()
    emb = encoder.encode(EXAMPLES, normalize_embeddings=True)
    done = time.perf_counter()
    sim = (emb @ emb.T).numpy()
    name = encoder.model_id or args.model or "default model"
    print(f"model: {name} | pooling: {encoder.pooling_mode} | dim: {emb.shape[1]} | device: {encoder.device}")
    print(f"load {loaded - start:.1f} s, encode {len(EXAMPLES)} sentences {1000 * (done - loaded):.0f} ms\n")
    for i, text in enumerate(EXAMPLES):
        print(f"[{i}] {text}")
    print("\ncosine similarity")
    print("     " + "".join(f"{j:>7}" for j in range(len(EXAMPLES))))
    for i, row in enumerate(sim):
        print(f"[{i}]  " + "".join(f"{v:7.3f}" for v in row))
    if not args.peft:
        print(
            "\nnote: this base model has no LLM2Vec training yet (bidirectional attention alone lowers quality);"
            "\ntrain adapters with `llm2vec-fast train mntp|simcse` and pass them with --peft."
        )
    return 0
