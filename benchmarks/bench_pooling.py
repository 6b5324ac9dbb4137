"""Bandwidth (GB/s) of the Triton masked pooling against torch and against a plain copy.

Methods per (layout, mode):
  * ``triton``      -- ``masked_pool`` (padded ``[B, L, D]``) / ``masked_pool_varlen`` (packed ``[T, D]``).
  * ``torch-ref``   -- the same call with ``backend="torch"`` (``kernels/pooling_reference.py``).
  * ``torch-eager`` -- padded ``mean`` only: ``(h * m).sum(1) / m.sum(1)``, the usual masked mean.
  * ``torch-gather`` -- ``last`` only: ``hidden.index_select(0, rows)`` of the selected rows, computed
    beforehand (outside the timing): the floor of any gather; ``last`` is compared with it, not with
    copy bandwidth (it reads one row per sequence).
  * ``copy``        -- ``dst.copy_(hidden)``: the device-to-device bandwidth the pooling is compared to.

Bytes counted are the bytes a pooling must move: forward ``mean``/``weighted_mean`` read the hidden
states once (``T * D`` elements) plus the mask and write ``[B, D]``; ``last`` reads the mask and one row
per sequence; the backward writes ``T * D`` gradients. ``copy`` moves ``2 * T * D`` elements (read +
write). ``vs_copy`` = GB/s of the method / GB/s of the copy.

Run on a CUDA machine: ``python benchmarks/bench_pooling.py [--quick]``. Writes
``benchmarks/results/pooling-<card>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import math

import torch

from llm2vec_fast.profiling import pooling_bytes

try:
    from . import common
except ImportError:  # run as a script
    import common

DEVICE = "cuda"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--hidden", type=int, default=None, help="hidden size D (default 4096, 2048 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="padded batch size (default 64, 32 with --quick)")
    p.add_argument("--seq-len", type=int, default=512, help="padded length L (default 512)")
    p.add_argument("--density", type=float, default=1.0, help="fraction of tokens pooled (default 1.0)")
    p.add_argument("--modes", nargs="+", default=["mean", "weighted_mean", "last"])
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default="pooling", help="results file stem (default: pooling)")
    return p.parse_args(argv)


def make_inputs(args, dtype):
    """``{layout: (hidden, pool_fn_args, pool_fn_kwargs, n_tokens, n_seqs)}`` with
    ``pool_fn(hidden, *pool_fn_args, mode, backend=..., **pool_fn_kwargs)``. The varlen call gets
    ``max_seqlen`` as :func:`llm2vec_fast.packing.pack` gives it: sync-free, no host read of ``cu_seqlens``."""
    from llm2vec_fast.kernels import cu_seqlens_from_lengths

    d = args.hidden or (2048 if args.quick else 4096)
    batch = args.batch or (32 if args.quick else 64)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    padded = torch.randn(batch, args.seq_len, d, device=DEVICE, dtype=dtype, generator=gen)
    mask = torch.rand(batch, args.seq_len, device=DEVICE, generator=gen) < args.density
    lengths = common.lognormal_lengths(batch * args.seq_len // 4, 96, 8, args.seq_len)
    packed = torch.randn(sum(lengths), d, device=DEVICE, dtype=dtype, generator=gen)
    pool_mask = torch.rand(sum(lengths), device=DEVICE, generator=gen) < args.density
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    return {
        f"padded B={batch} L={args.seq_len} D={d}": (padded, (mask,), {}, batch * args.seq_len, batch),
        f"varlen {len(lengths)} seqs T={sum(lengths)} D={d}": (
            packed,
            (cu, pool_mask),
            {"max_seqlen": max(lengths)},
            sum(lengths),
            len(lengths),
        ),
    }


def selected_rows(hidden, extra, mode):
    """``(as_rows, rows)``: a view of ``hidden`` as ``[T, D]`` and the row each sequence pools in
    ``last``/``first`` mode (every sequence of the benchmark has a pooled token)."""
    if hidden.dim() == 3:
        (mask,) = extra
        batch, length, _ = hidden.shape
        pos = torch.arange(length, device=mask.device).expand(batch, length)
        picked = torch.where(mask, pos, -1).amax(1) if mode == "last" else torch.where(mask, pos, length).amin(1)
        return (lambda h: h.reshape(batch * length, -1)), picked + torch.arange(batch, device=mask.device) * length
    cu, mask = extra
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=mask.device), cu.diff().long())
    pos = torch.arange(mask.numel(), device=mask.device)
    if mode == "last":
        picked = torch.full((cu.numel() - 1,), -1, device=mask.device).scatter_reduce(0, seq, torch.where(mask, pos, -1), "amax")
    else:
        picked = torch.full((cu.numel() - 1,), mask.numel(), device=mask.device).scatter_reduce(
            0, seq, torch.where(mask, pos, mask.numel()), "amin"
        )
    return (lambda h: h), picked


def eager_masked_mean(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def main(argv=None) -> None:
    args = parse_args(argv)
    common.require_cuda("bench_pooling.py")
    from llm2vec_fast.kernels import masked_pool, masked_pool_varlen

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    rows, groups = [], []
    for layout, (hidden, extra, kwargs, n_tok, n_seq) in make_inputs(args, dtype).items():
        d = hidden.shape[-1]
        dst = torch.empty_like(hidden)
        copy_ms, _ = common.try_time_ms(lambda: dst.copy_(hidden), args.quick)
        copy_gbps = 2 * n_tok * d * elt / copy_ms / 1e6
        rows.append(
            {
                "layout": layout,
                "mode": "-",
                "method": "copy",
                "fwd_ms": copy_ms,
                "fwd_gbps": copy_gbps,
                "fwd_vs_copy": 1.0,
                "fwd_bwd_ms": math.nan,
                "fwd_bwd_gbps": math.nan,
                "note": "",
            }
        )
        pool = masked_pool if hidden.dim() == 3 else masked_pool_varlen
        leaf = hidden.detach().requires_grad_()
        for mode in args.modes:
            fwd_bytes = pooling_bytes(n_tok, n_seq, d, elt, mode)
            bwd_bytes = n_tok * d * elt + n_tok + n_seq * d * elt
            methods = {
                "triton": lambda: pool(leaf, *extra, mode, backend="triton", **kwargs),
                "torch-ref": lambda: pool(leaf, *extra, mode, backend="torch", **kwargs),
            }
            if hidden.dim() == 3 and mode == "mean":
                methods["torch-eager"] = lambda: eager_masked_mean(leaf, *extra)
            if mode in ("last", "first"):
                rows_2d, picked = selected_rows(hidden, extra, mode)
                methods["torch-gather"] = lambda: rows_2d(leaf).index_select(0, picked)
            for name, fn in methods.items():
                ms_f, ms_fb, note = common.time_fwd_and_fwd_bwd(fn, [leaf], args.quick)
                gbps = fwd_bytes / ms_f / 1e6
                rows.append(
                    {
                        "layout": layout,
                        "mode": mode,
                        "method": name,
                        "fwd_ms": ms_f,
                        "fwd_gbps": gbps,
                        "fwd_vs_copy": gbps / copy_gbps,
                        "fwd_bwd_ms": ms_fb,
                        "fwd_bwd_gbps": (fwd_bytes + bwd_bytes) / ms_fb / 1e6,
                        "note": note,
                    }
                )
            groups.append(f"{layout.split()[0]} {mode}")
        del dst, leaf

    common.print_table(
        rows, ["layout", "mode", "method", "fwd_ms", "fwd_gbps", "fwd_vs_copy", "fwd_bwd_ms", "fwd_bwd_gbps", "note"], "{:.3f}"
    )
    config = {k: v for k, v in vars(args).items() if k != "no_plot"}
    path = common.write_json(args.name, {"config": config, "bytes": __doc__.split("\n\n")[2], "results": rows})
    print(f"\nwrote {path}")
    if not args.no_plot:
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "copy"]

        def value(group, method):
            kind, mode = group.split(" ", 1)
            return next(
                (r["fwd_gbps"] for r in rows if r["layout"].startswith(kind) and r["mode"] == mode and r["method"] == method), math.nan
            )

        series = {m: [value(g, m) for g in groups] for m in methods}
        series["copy"] = [
            next(r["fwd_gbps"] for r in rows if r["method"] == "copy" and r["layout"].startswith(g.split()[0])) for g in groups
        ]
        png = common.plot_grouped_bars(args.name, f"masked pooling forward, {args.dtype}", "GB/s", groups, {"forward bandwidth": series})
        if png:
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
