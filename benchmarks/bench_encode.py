"""Real tokens/s of ``LLM2Vec`` encoding: the packed varlen path against the padded SDPA reference.

Paths (same random-weight model, same inputs, bf16):
  * ``packed``    -- ``LLM2Vec`` default on CUDA: token-budget batches (``max_tokens_per_batch``,
    default 16384), Triton varlen attention and varlen pooling.
  * ``reference`` -- what the official llm2vec runs: ``packed=False``, length-sorted batches of 64,
    Hugging Face SDPA attention with a 4-D padding mask.

Models: random weights with Llama-3.2-1B and Llama-3-8B shapes (``llm2vec_fast.synthetic``), built on
the GPU (no download). Workload: lognormal token lengths, median 96, clipped to 8..512.

What is timed: ``LLM2Vec.embed_items`` = ``encode()`` after tokenisation (batching, host-side
padding/packing, host-to-device copies, forward, pooling, float32 copy back to the host), end to end
with ``time.perf_counter`` after a CUDA synchronise, after a full warm-up pass (Triton autotuning).
Tokenisation is NOT timed: there is no tokenizer for random weights, inputs are random token ids.
tokens/s counts real (non-padding) tokens. The two paths must agree: min cosine >= 0.99.

Run on a CUDA machine: ``python benchmarks/bench_encode.py [--quick]``. Writes
``benchmarks/results/encode-<card>.json`` and ``.png``. ``--cpu-smoke`` runs the same code on CPU with a
tiny model and a dozen inputs (a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common

#: Minimum speed-up of the packed path over the reference, per shape (issue 3).
TARGETS = {"llama-8b": 2.0, "llama-1b": 3.0}
MIN_COSINE = 0.99
REFERENCE_BATCH_SIZE = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer inputs and repetitions (about a minute on an H100)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, a dozen inputs: checks the script, measures nothing")
    p.add_argument("--shapes", nargs="+", default=None, help="random shapes (default: llama-1b llama-8b; tiny with --cpu-smoke)")
    p.add_argument(
        "--num-texts", type=int, nargs="+", default=None, help="inputs per shape (default 4096 for 1b, 2048 for 8b; a quarter with --quick)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed passes per path, the median is kept (default 3, 2 with --quick)")
    p.add_argument("--max-tokens-per-batch", type=int, default=None, help="packed token budget (default: LLM2Vec's)")
    p.add_argument("--batch-size", type=int, default=REFERENCE_BATCH_SIZE, help="reference batch size (default 64)")
    p.add_argument("--results-dir", default=None, help="where the JSON and PNG go (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default="encode", help="results file stem (default: encode)")
    return p.parse_args(argv)


def settings(args) -> dict:
    """Shapes, input counts, repeats, batch sizes and device for this run."""
    if args.cpu_smoke:
        torch.set_num_threads(1)  # a tiny model: extra threads only add barrier waits on a busy CPU
        shapes = args.shapes or ["tiny"]
        counts = args.num_texts or [12] * len(shapes)
        return dict(
            shapes=shapes,
            counts=counts,
            repeats=args.repeats or 1,
            device="cpu",
            dtype=torch.float32,
            max_len=64,
            batch_size=min(args.batch_size, 4),
            max_tokens=args.max_tokens_per_batch or 128,
        )
    from llm2vec_fast.packing import DEFAULT_MAX_TOKENS_PER_BATCH

    shapes = args.shapes or ["llama-1b", "llama-8b"]
    default_counts = {"llama-1b": 4096, "llama-8b": 2048}
    counts = args.num_texts or [default_counts.get(s, 1024) // (4 if args.quick else 1) for s in shapes]
    return dict(
        shapes=shapes,
        counts=counts,
        repeats=args.repeats or (2 if args.quick else 3),
        device="cuda",
        dtype=torch.bfloat16,
        max_len=512,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens_per_batch or DEFAULT_MAX_TOKENS_PER_BATCH,
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def padding_tokens(encoder, items, batch_size: int) -> int:
    """Padding tokens the reference path adds: each of its batches is padded to its longest input."""
    encoder.packed = False
    lengths = [len(x.input_ids) for x in items]
    batches = encoder._batches(items, batch_size)
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def time_path(encoder, items, batch_size: int, repeats: int, device: str) -> dict:
    """Warm up once, then ``repeats`` timed ``embed_items`` passes; median seconds, peak memory, output."""
    encoder.embed_items(items, batch_size)  # warm-up: Triton autotune/compile for every length bucket
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = encoder.embed_items(items, batch_size)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan
    n_batches = len(encoder._batches(items, batch_size))
    return {"seconds": statistics.median(times), "all_seconds": times, "peak_mem_gib": peak, "batches": n_batches, "out": out}


def bench_shape(shape: str, n_texts: int, cfg: dict, seed: int = 0) -> tuple[list[dict], dict]:
    from llm2vec_fast.synthetic import RANDOM_SHAPES, random_encoder, random_items, sample_lengths

    device = cfg["device"]
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build = time.perf_counter()
    encoder = random_encoder(shape, device, cfg["dtype"], seed=seed, max_tokens_per_batch=cfg["max_tokens"])
    _sync(device)
    build = time.perf_counter() - build
    weights_gib = sum(p.numel() * p.element_size() for p in encoder.model.parameters()) / 2**30
    lengths = sample_lengths(n_texts, 96, 8, cfg["max_len"], seed=seed)
    items = random_items(lengths, RANDOM_SHAPES[shape]["vocab_size"], seed=seed)
    tokens = sum(lengths)

    runs = {}
    for method, packed in (("reference", False), ("packed", True)):
        encoder.packed = packed
        runs[method] = time_path(encoder, items, cfg["batch_size"], cfg["repeats"], device)
    ref, fast = runs["reference"]["out"], runs["packed"]["out"]
    cosine = torch.nn.functional.cosine_similarity(ref, fast, dim=-1)
    finite = bool(torch.isfinite(ref).all() and torch.isfinite(fast).all())
    pad = padding_tokens(encoder, items, cfg["batch_size"])

    rows = []
    for method, r in runs.items():
        rows.append(
            {
                "shape": shape,
                "method": method,
                "texts": n_texts,
                "tokens": tokens,
                "batches": r["batches"],
                "batching": f"{cfg['batch_size']} inputs, length-sorted, padded"
                if method == "reference"
                else f"token budget {cfg['max_tokens']}, packed",
                "seconds": r["seconds"],
                "tokens_per_s": tokens / r["seconds"],
                "peak_mem_gib": r["peak_mem_gib"],
                "all_seconds": r["all_seconds"],
            }
        )
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    target = TARGETS.get(shape)
    summary = {
        "shape": shape,
        "texts": n_texts,
        "tokens": tokens,
        "mean_length": tokens / n_texts,
        "max_length": max(lengths),
        "reference_padding_fraction": pad / (tokens + pad),
        "weights_gib": weights_gib,
        "build_s": build,
        "speedup": speedup,
        "target": target,
        "meets_target": None if target is None else speedup >= target,
        "min_cosine": cosine.min().item(),
        "mean_cosine": cosine.mean().item(),
        "finite": finite,
        "agree": finite and cosine.min().item() >= MIN_COSINE,
    }
    del encoder, runs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows, summary


def report(args, cfg, rows, summaries) -> None:
    """Write the JSON (and PNG) for the shapes measured so far."""
    config = {k: v for k, v in vars(args).items() if k != "no_plot"}
    config.update(
        repeats=cfg["repeats"],
        max_tokens_per_batch=cfg["max_tokens"],
        reference_batch_size=cfg["batch_size"],
        dtype=str(cfg["dtype"]).replace("torch.", ""),
        device=cfg["device"],
    )
    payload = {
        "config": config,
        "timed": __doc__.split("\n\n")[3].replace("\n", " "),
        "tokenisation_timed": False,
        "targets": TARGETS,
        "results": rows,
        "summary": summaries,
    }
    path = common.write_json(args.name, payload, args.results_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        groups = [s["shape"] for s in summaries]
        series = {
            m: [next(r["tokens_per_s"] for r in rows if r["shape"] == g and r["method"] == m) for g in groups]
            for m in ("reference", "packed")
        }
        png = common.plot_grouped_bars(
            args.name, "LLM2Vec encode, real tokens/s", "tokens/s", groups, {"throughput (higher is better)": series}, args.results_dir
        )
        if png:
            print(f"wrote {png}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_encode.py: no CUDA GPU on this machine, nothing to measure (use --cpu-smoke to check the script on CPU).")
        return 0
    cfg = settings(args)
    if len(cfg["counts"]) != len(cfg["shapes"]):
        raise SystemExit("--num-texts needs one value per shape")
    rows, summaries = [], []
    for shape, n_texts in zip(cfg["shapes"], cfg["counts"]):
        print(f"\n== {shape}: {n_texts} inputs, {cfg['repeats']} timed passes per path", flush=True)
        shape_rows, summary = bench_shape(shape, n_texts, cfg)
        rows += shape_rows
        summaries.append(summary)
        common.print_table(shape_rows, ["method", "batches", "seconds", "tokens_per_s", "peak_mem_gib", "batching"], "{:.3f}")
        target = (
            "" if summary["target"] is None else f" (target >= {summary['target']:.1f}x: {'met' if summary['meets_target'] else 'MISSED'})"
        )
        print(
            f"speed-up {summary['speedup']:.2f}x{target}; cosine min {summary['min_cosine']:.4f}; "
            f"reference padding {100 * summary['reference_padding_fraction']:.1f}%; weights {summary['weights_gib']:.1f} GiB, "
            f"built in {summary['build_s']:.1f} s",
            flush=True,
        )
        report(args, cfg, rows, summaries)  # after every shape: a later timeout keeps what was measured
    bad = [s["shape"] for s in summaries if not s["agree"]]
    if bad:
        print(f"ERROR: the two paths disagree (min cosine < {MIN_COSINE} or non-finite) for {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
