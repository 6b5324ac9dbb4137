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
    from ..default_model import is_default_encoder, is_default_model

    start = time.perf_counter()
    encoder = load_encoder(args)
    loaded = time.perf_counter()
    emb = encoder.encode(EXAMPLES, normalize_embeddings=True)
    done = time.perf_counter()
    sim = (emb @ emb.T).numpy()
    trained_default = is_default_encoder(args.model) and not args.peft
    name = "default (SmolLM2-135M-Instruct + LLM2Vec adapters)" if trained_default else (args.model or encoder.model_id)
    print(f"model: {name} | pooling: {encoder.pooling_mode} | dim: {emb.shape[1]} | device: {encoder.device}")
    print(f"load {loaded - start:.1f} s, encode {len(EXAMPLES)} sentences {1000 * (done - loaded):.0f} ms\n")
    for i, text in enumerate(EXAMPLES):
        print(f"[{i}] {text}")
    print("\ncosine similarity")
    print("     " + "".join(f"{j:>7}" for j in range(len(EXAMPLES))))
    for i, row in enumerate(sim):
        print(f"[{i}]  " + "".join(f"{v:7.3f}" for v in row))
    print("\nnearest neighbour")
    for i, j in enumerate(nearest_neighbours(sim)):
        print(f"[{i}] -> [{j}] {EXAMPLES[j]}  ({sim[i, j]:.3f})")
    if is_default_model(args.model) and not trained_default and not args.peft:
        print(
            f"\nnote: {args.model!r} is the base model without LLM2Vec training (bidirectional attention alone lowers"
            "\nquality); the default encoder (no --model) carries trained adapters."
        )
    return 0


def nearest_neighbours(sim) -> list[int]:
    """Index of each row's most similar other row."""
    import numpy as np

    sim = np.array(sim, dtype=np.float64, copy=True)
    np.fill_diagonal(sim, -np.inf)
    return [int(j) for j in sim.argmax(1)]
