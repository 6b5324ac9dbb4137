"""``llm2vec-fast profile``: one encode workload under ``torch.profiler``, a per-kernel table with the
achieved attention TFLOP/s and pooling GB/s, and a Chrome trace."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from ..packing import DEFAULT_MAX_TOKENS_PER_BATCH
from ..synthetic import RANDOM_SHAPES
from .common import add_model_options, load_encoder

MIN_LENGTH, MAX_LENGTH = 8, 512


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="profile one encode workload (per-kernel table, Chrome trace)",
        description="Encode random token ids of realistic lengths (lognormal, median 96, 8..512 tokens) under "
        "torch.profiler and print a per-kernel table with the achieved attention TFLOP/s and pooling GB/s "
        "against the card's peak. Tokenisation is not part of the workload.",
    )
    add_model_options(p)
    p.add_argument(
        "--random-shapes",
        choices=tuple(RANDOM_SHAPES),
        default=None,
        help="random weights with these shapes instead of a checkpoint (no download)",
    )
    p.add_argument("--num-texts", type=int, default=None, help="inputs to encode (default 1024 on CUDA, 32 on CPU)")
    p.add_argument("--median-length", type=int, default=96, help="median tokens per input (default 96)")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per batch on the padded path (default 64)")
    p.add_argument("--max-tokens-per-batch", type=int, default=DEFAULT_MAX_TOKENS_PER_BATCH, help="token budget of a packed batch")
    p.add_argument("--padded", action="store_true", help="force the padded SDPA path (the packed path is the CUDA default)")
    p.add_argument("--trace", type=Path, default=Path("profile-trace.json"), help="Chrome trace output (default profile-trace.json)")
    p.add_argument("--top", type=int, default=15, help="kernels listed (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _build_encoder(args: argparse.Namespace):
    if args.random_shapes is None:
        return load_encoder(args)
    if args.model is not None or args.peft or args.no_bidirectional:
        raise ValueError("--random-shapes builds its own (bidirectional) model: drop --model / --peft / --no-bidirectional")
    from ..synthetic import random_encoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    options = (("pooling_mode", args.pooling), ("max_length", args.max_length), ("doc_max_length", args.doc_max_length))
    settings = {k: v for k, v in options if v is not None}
    return random_encoder(args.random_shapes, device, dtype, seed=args.seed, **settings)


@contextlib.contextmanager
def _annotated_pooling(encoder):
    """Mark the padded path's pooling with a profiler range, so its CPU ops count as pooling."""
    pool = encoder.pool

    def annotated(*a, **kw):
        with torch.profiler.record_function("llm2vec_fast::pool"):
            return pool(*a, **kw)

    encoder.pool = annotated
    try:
        yield
    finally:
        del encoder.pool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile

    from ..encoding import KERNEL_POOLING_MODE
    from ..profiling import Work, attention_flops, card_peak, kernel_rows, pooling_bytes, render_kernel_table
    from ..synthetic import random_items, sample_lengths

    for flag, value in (
        ("--top", args.top),
        ("--num-texts", args.num_texts),
        ("--median-length", args.median_length),
        ("--batch-size", args.batch_size),
        ("--max-tokens-per-batch", args.max_tokens_per_batch),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_length is not None and args.max_length < MIN_LENGTH:
        raise ValueError(f"--max-length must be at least {MIN_LENGTH} (the shortest input the workload draws), got {args.max_length}")
    encoder = _build_encoder(args)
    encoder.max_tokens_per_batch = args.max_tokens_per_batch
    if args.padded:
        encoder.packed = False
    device, config = encoder.device, encoder.config
    on_cuda = device.type == "cuda"
    n = args.num_texts or (1024 if on_cuda else 32)
    lengths = sample_lengths(n, args.median_length, MIN_LENGTH, min(MAX_LENGTH, encoder.max_length), seed=args.seed)
    items = random_items(lengths, int(config.vocab_size), seed=args.seed)
    dtype = next(encoder.model.parameters()).dtype
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    work = Work(
        attention_flops=attention_flops(lengths, heads, head_dim, int(config.num_hidden_layers)),
        pooling_bytes=pooling_bytes(sum(lengths), n, encoder.hidden_size, dtype.itemsize, KERNEL_POOLING_MODE[encoder.pooling_mode]),
        dtype=dtype,
    )
    path = "packed varlen" if encoder.use_packed else f"padded SDPA, batch {args.batch_size}"
    model_name = f"random {args.random_shapes}" if args.random_shapes else (args.model or "default model")
    print(f"model: {model_name}; device {device}, {str(dtype).replace('torch.', '')}; path: {path}")
    print(
        f"workload: {n} inputs of random token ids, {sum(lengths)} tokens (lengths {min(lengths)}..{max(lengths)}, "
        f"median {args.median_length}); tokenisation not included"
    )

    # warm up (Triton autotuning on CUDA covers every length bucket of the workload)
    encoder.embed_items(items if on_cuda else items[:2], args.batch_size)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with _annotated_pooling(encoder), profile(activities=activities) as prof:
        start = time.perf_counter()
        encoder.embed_items(items, args.batch_size)
        _sync(device)
        wall = time.perf_counter() - start
    args.trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.trace))

    peak = card_peak(torch.cuda.get_device_name(device)) if on_cuda else None
    rows = kernel_rows(prof.events(), on_device=on_cuda)
    print(
        f"profiled encode: {wall:.3f} s wall ({sum(lengths) / wall:,.0f} tokens/s under the profiler); "
        f"times below are {'GPU kernel' if on_cuda else 'CPU self'} times\n"
    )
    print(render_kernel_table(rows, work, peak, args.top))
    print(f"\nChrome trace: {args.trace} (open in chrome://tracing or https://ui.perfetto.dev)")
    return 0
