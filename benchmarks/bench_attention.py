"""TFLOP/s of the Triton varlen attention against PyTorch attention on the same packed batch.

Methods (all bidirectional, same sequences):
  * ``triton-varlen``  -- ``llm2vec_fast.kernels.flash_attn_varlen`` on packed ``[T, H, D]`` (GQA native).
  * ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient`` -- ``scaled_dot_product_attention`` pinned with
    ``torch.nn.attention.sdpa_kernel``; dense ``[B, H, L, D]`` for equal lengths, nested jagged
    tensors for the mixed-length batch (n/a where the backend rejects them).
  * ``sdpa-mask4d``    -- the default SDPA backend on a padded batch with a 4-D boolean padding mask
    (what Hugging Face and the official llm2vec run).
  * ``flex-docmask``   -- FlexAttention (``torch.compile``) over the packed batch with a document mask
    (skipped with ``--quick`` unless ``--flex``: its compiles alone take minutes).

SDPA baselines get key/value heads already repeated to ``Hq`` (outside the timing), which favours them.
FLOPs (flash-attention convention): forward ``4 * sum(L_i^2) * Hq * D``; backward 2.5x that, so
forward+backward = 3.5x. Padding work is not counted: every method is credited with the useful FLOPs.

Run on a CUDA machine: ``python benchmarks/bench_attention.py [--quick]``. Writes
``benchmarks/results/attention-<card>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from llm2vec_fast.profiling import attention_flops

try:
    from . import common
except ImportError:  # run as a script
    import common

FWD_BWD_FLOP_FACTOR = 3.5
DEVICE = "cuda"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (a smoke run)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--total-tokens", type=int, default=16384, help="packed tokens per batch (default 16384)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="equal-length shapes (default 512 2048 8192)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument(
        "--flex", action="store_true", help="run FlexAttention with --quick too (--quick skips it: its compiles alone take minutes)"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default="attention", help="results file stem (default: attention)")
    return p.parse_args(argv)


def workloads(args) -> list[tuple[str, list[int]]]:
    lengths = args.lengths or ([512, 2048] if args.quick else [512, 2048, 8192])
    shapes = [(f"L={n}", [n] * max(1, args.total_tokens // n)) for n in lengths]
    shapes.append(("mix (median 96)", common.lognormal_lengths(args.total_tokens, 96, 8, 512)))
    return shapes


def build_methods(lengths, args, dtype):
    """``{method: (forward_fn, leaf tensors)}`` for one batch; forward_fn returns a tensor to backprop."""
    from llm2vec_fast.kernels import cu_seqlens_from_lengths, flash_attn_varlen
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, hq, hkv, d = DEVICE, args.heads, args.kv_heads, args.head_dim
    n_tok, n_seq, max_len = sum(lengths), len(lengths), max(lengths)
    equal = len(set(lengths)) == 1
    cu = cu_seqlens_from_lengths(lengths, dev)

    def leaf(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_()

    q, k, v = leaf(n_tok, hq, d), leaf(n_tok, hkv, d), leaf(n_tok, hkv, d)
    methods = {"triton-varlen": (lambda: flash_attn_varlen(q, k, v, cu, max_len), (q, k, v))}

    # SDPA: kv heads repeated up front
    qe, ke, ve = leaf(n_tok, hq, d), leaf(n_tok, hq, d), leaf(n_tok, hq, d)
    backends = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    if equal:

        def dense(x):  # [T, H, D] -> [B, H, L, D]
            return x.view(n_seq, max_len, hq, d).transpose(1, 2)
    else:
        offsets = cu.long()

        def dense(x):  # [T, H, D] -> nested jagged [B, H, j, D]
            return torch.nested.nested_tensor_from_jagged(x, offsets=offsets).transpose(1, 2)

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(dense(qe), dense(ke), dense(ve))

        return run

    for name, backend in backends.items():
        methods[name] = (sdpa(backend), (qe, ke, ve))

    # default backend, padded batch + 4-D padding mask (Hugging Face / official llm2vec)
    qp, kp, vp = (leaf(n_seq, hq, max_len, d) for _ in range(3))
    valid = torch.arange(max_len, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
    mask4d = valid[:, None, None, :].expand(n_seq, 1, max_len, max_len).contiguous()
    methods["sdpa-mask4d"] = (lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask4d), (qp, kp, vp))

    if not args.no_flex and (args.flex or not args.quick):
        try:
            methods["flex-docmask"] = _flex_method(lengths, leaf, hq, hkv, d, dev)
        except Exception as exc:  # FlexAttention missing or failing on this torch build
            methods["flex-docmask"] = f"{type(exc).__name__}: {str(exc)[:160]}"

    check = _max_error_vs_reference(q, k, v, cu, max_len)
    return methods, check


def _flex_method(lengths, leaf, hq, hkv, d, dev):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_tok = sum(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    block_mask = create_block_mask(same_doc, None, None, n_tok, n_tok, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    qf, kf, vf = leaf(1, hq, n_tok, d), leaf(1, hkv, n_tok, d), leaf(1, hkv, n_tok, d)
    return (lambda: flex(qf, kf, vf, block_mask=block_mask, enable_gqa=True)), (qf, kf, vf)


def _max_error_vs_reference(q, k, v, cu, max_len) -> float:
    """Max |triton - SDPA per sequence| on this batch: a sanity check printed with the timings."""
    from llm2vec_fast.kernels import flash_attn_varlen, flash_attn_varlen_reference

    with torch.no_grad():
        out = flash_attn_varlen(q, k, v, cu, max_len)
        ref = flash_attn_varlen_reference(q, k, v, cu)
        return (out.float() - ref.float()).abs().max().item()


def measure(methods, flops: float, quick: bool) -> list[dict]:
    rows = []
    for name, method in methods.items():
        if isinstance(method, str):  # could not be set up
            rows.append(
                {
                    "method": name,
                    "fwd_ms": math.nan,
                    "fwd_tflops": math.nan,
                    "fwd_bwd_ms": math.nan,
                    "fwd_bwd_tflops": math.nan,
                    "note": method,
                }
            )
            continue
        ms_f, ms_fb, note = common.time_fwd_and_fwd_bwd(*method, quick)
        rows.append(
            {
                "method": name,
                "fwd_ms": ms_f,
                "fwd_tflops": flops / ms_f / 1e9,
                "fwd_bwd_ms": ms_fb,
                "fwd_bwd_tflops": FWD_BWD_FLOP_FACTOR * flops / ms_fb / 1e9,
                "note": note,
            }
        )
    return rows


def ratio(rows, method, baseline, key) -> float:
    by = {r["method"]: r[key] for r in rows}
    a, b = by.get(method, math.nan), by.get(baseline, math.nan)
    return a / b if b and not math.isnan(b) else math.nan


def main(argv=None) -> None:
    args = parse_args(argv)
    common.require_cuda("bench_attention.py")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    all_rows, ratios, groups = [], [], []
    for label, lengths in workloads(args):
        torch.cuda.empty_cache()
        flops = attention_flops(lengths, args.heads, args.head_dim)
        methods, err = build_methods(lengths, args, dtype)
        print(
            f"\n== {label}: {len(lengths)} sequences, {sum(lengths)} tokens, max {max(lengths)}; "
            f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}; "
            f"max |triton - sdpa reference| = {err:.2e}"
        )
        rows = measure(methods, flops, args.quick)
        common.print_table(rows, ["method", "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops", "note"], "{:.3f}")
        for r in rows:
            all_rows.append({"shape": label, "n_seqs": len(lengths), "tokens": sum(lengths), **r})
        ratios.append(
            {
                "shape": label,
                "fwd_vs_cudnn": ratio(rows, "triton-varlen", "sdpa-cudnn", "fwd_tflops"),
                "fwd_vs_flash": ratio(rows, "triton-varlen", "sdpa-flash", "fwd_tflops"),
                "fwd_bwd_vs_flash": ratio(rows, "triton-varlen", "sdpa-flash", "fwd_bwd_tflops"),
                "fwd_vs_mask4d": ratio(rows, "triton-varlen", "sdpa-mask4d", "fwd_tflops"),
                "fwd_bwd_vs_flex": ratio(rows, "triton-varlen", "flex-docmask", "fwd_bwd_tflops"),
                "max_abs_err_vs_sdpa": err,
            }
        )
        groups.append(label)
        del methods

    print("\nSpeed ratios of triton-varlen (>1 = faster than the baseline):")
    common.print_table(ratios, ["shape", "fwd_vs_cudnn", "fwd_vs_flash", "fwd_bwd_vs_flash", "fwd_vs_mask4d", "fwd_bwd_vs_flex"], "{:.2f}")
    config = {k: v for k, v in vars(args).items() if k != "no_plot"}
    path = common.write_json(
        args.name, {"config": config, "flops": "fwd 4*sum(L^2)*Hq*D; fwd+bwd 3.5x fwd", "results": all_rows, "ratios": ratios}
    )
    print(f"\nwrote {path}")
    if not args.no_plot:
        names = list(dict.fromkeys(r["method"] for r in all_rows))
        panels = {
            title: {m: [next((r[key] for r in all_rows if r["shape"] == g and r["method"] == m), math.nan) for g in groups] for m in names}
            for title, key in (("forward", "fwd_tflops"), ("forward + backward", "fwd_bwd_tflops"))
        }
        png = common.plot_grouped_bars(args.name, f"varlen attention, {args.dtype}", "TFLOP/s", groups, panels)
        if png:
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
