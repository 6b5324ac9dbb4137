"""Regenerate the result tables of the docs from the benchmarks' JSON: the headline summary (in
``README.md`` and ``docs/benchmarks.md``), and on the benchmarks page the CPU int8 GEMM, serve, dataset,
recipe and recipe Matryoshka tables and the GPU suite's tables (encode with MFU, attention, pooling, first
embedding, FP8 / fused / CUDA-graph paths, training, ONNX Runtime on CUDA, FP8 load time) of every card that has results;
the FP8 fidelity table on the benchmarks page and in ``docs/encoding.md``.

    python benchmarks/readme_results.py          # rewrites the text between the markers of the pages

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; a page without a marker is
left alone there; a missing JSON leaves a note instead, so no page shows a number that no results
file holds. (``bench_onnx.py --docs`` writes the ONNX tables the same way.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BENCHMARKS_PAGE = ROOT / "docs" / "benchmarks.md"
ENCODING_PAGE = ROOT / "docs" / "encoding.md"  # the FP8 fidelity table
PAGES = (README, BENCHMARKS_PAGE, ENCODING_PAGE)


def replace_between_markers(text: str, marker: str, body: str) -> str:
    """``text`` with the part between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` set to ``body``
    (unchanged when the markers are absent)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def serve_table(result: dict) -> str:
    """Ours vs the peer server vs direct ``encode()`` (``bench_serve.py``)."""
    if "servers" not in result:
        return legacy_serve_table(result)
    base, summary, env, config = result["baseline"], result["summary"], result["environment"], result["config"]
    checks = summary["checks"]

    def verdict(name: str) -> str:
        return "met" if checks.get(name) else "**missed**"

    head = (
        f"{env['date'][:10]}, {config['threads']} threads, {config['requests']} requests of {config['texts_per_request']} "
        f"text(s) per level ({config['texts_source']}), load average {summary['load_avg_before']:.2f} before the run. "
        f"Direct `{base['method']}` of all the texts: {base['texts_per_s']:.1f} texts/s; of one request alone: "
        f"p50 {base['request_encode_p50_ms']:.1f} ms. At {summary['highest_concurrency']} clients: "
        f"**{summary['vs_direct_encode']:.2f}x** direct (target >= {summary['vs_direct_encode_target']}: {verdict('vs_direct_encode')}), "
        f"p99/p50 {summary['p99_over_p50']:.2f} (<= {summary['p99_over_p50_target']}: {verdict('p99_over_p50')})"
    )
    if "vs_peer" in summary:
        head += f", {summary['vs_peer']:.2f}x infinity-emb ({verdict('ahead_of_peer')})"
    if "c1_p50_over_request_encode" in summary:
        head += (
            f"; at 1 client p50 {summary['c1_p50_over_request_encode']:.2f}x direct (<= {summary['c1_p50_target']}: {verdict('c1_p50')})"
        )
    head += f"; min cosine vs `encode()` {summary['min_cosine_vs_encode']:.7f} ({verdict('min_cosine')})."
    lines = [
        head,
        "",
        "| clients | server | texts/s | vs direct | p50 ms | p95 ms | p99 ms | server CPU s | client CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for c in config["concurrency"]:
        for name, server in result["servers"].items():
            row = next((r for r in server["rows"] if r["concurrency"] == c), None)
            if row is None:
                if server.get("error") and c == config["concurrency"][0]:
                    notes.append(f"{name}: no row ({server['error']})")
                continue
            lines.append(
                f"| {c} | {name} | {row['texts_per_s']:.1f} | {row['vs_direct_encode']:.2f}x | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} "
                f"| {row['p99_ms']:.0f} | {row['server_cpu_s']:.1f} | {row['client_cpu_s']:.2f} |"
            )
    return "\n".join(lines + ([""] + notes if notes else []))


def legacy_serve_table(result: dict) -> str:
    """Results written before the peer comparison (no ``servers``): kept until bench_serve.py re-runs."""
    base, summary, env = result["baseline"], result["summary"], result["environment"]
    lines = [
        f"{env['date'][:10]}, {result['config']['threads']} threads, {result['config']['requests']} one-sentence requests per "
        f"level ({result['config']['texts_source']}), load average {summary['load_avg_before']:.2f} before the run; "
        f"direct `encode()` of the same texts: {base['texts_per_s']:.1f} texts/s. "
        f"Speed-up ({summary['speedup_of']}): **{summary['speedup']:.2f}x** (target {summary['target']:.0f}x); "
        f"min cosine vs `encode()` {summary['min_cosine_vs_encode']:.6f}.",
        "",
        "| concurrency | requests/s | tokens/s | p50 ms | p95 ms | p99 ms | requests/batch | vs direct encode() |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['concurrency']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['mean_requests_per_batch']:.1f} | {r['vs_direct_encode']:.2f}x |"
        )
    return "\n".join(lines)


def dataset_table(result: dict) -> str:
    s, summary = result["settings"], result["summary"]
    lines = [
        f"{result['environment']['date'][:10]}, {s['threads']} threads, {s['num_texts']} texts ({s['tokens']} tokens), "
        f"chunks of {s['chunk_rows']} rows, median of {s['repeats']} runs, load average {s['load_average_before']:.2f} "
        f"before the run. Overhead `encode_dataset / encode()`: **{summary['overhead_ratio']:.2f}x** "
        f"(goal <= {summary['overhead_goal']}: {'met' if summary['overhead_ok'] else 'not met'}); "
        f"{s['ranks']} ranks vs 1 process: {summary['speedup_2_ranks_vs_1_proc']:.2f}x."
        + (
            f" Split: tokens through the model (padding included) {summary['forward_tokens_ratio']:.3f}x encode()'s, "
            f"reading/writing/bookkeeping {summary['io_and_bookkeeping_ratio']:.3f}x."
            if "forward_tokens_ratio" in summary
            else " (This run predates the padded-token counts.)"
        ),
        "",
        "| method | seconds | rows/s | tokens/s | tokens through the model | min cos vs encode() |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        forward = f"{r['forward_tokens']} ({r['padding_ratio']:.3f}x)" if "forward_tokens" in r else "n/a"
        lines.append(
            f"| {r['method']} | {r['seconds']:.2f} | {r['rows_per_s']:.1f} | {r['tokens_per_s']:.0f} | {forward} "
            f"| {r['min_cosine_vs_encode']:.6f} |"
        )
    return "\n".join(lines)


def _card_slugs(results: Path) -> list[str]:
    """Cards with GPU-suite results: the ``<card>`` of ``encode-<card>.json`` other than ``cpu``."""
    return sorted(p.stem[len("encode-") :] for p in results.glob("encode-*.json") if p.stem != "encode-cpu")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def encode_gpu_table(result: dict) -> str:
    env, rows = result["environment"], result["results"]
    lines = [
        f"`bench_encode.py{' --quick' if result['config'].get('quick') else ''}`, {env['card']}, {env['date'][:10]}, "
        f"torch {env['torch']}, triton {env['triton']}, {result['config']['dtype']}, random weights:",
        "",
        "| shape | texts | reference tokens/s | packed tokens/s | speed-up | target | reference padding | min cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        by = {r["method"]: r for r in rows if r["shape"] == s["shape"]}
        lines.append(
            f"| {s['shape']} | {s['texts']} | {by['reference']['tokens_per_s']:,.0f} | {by['packed']['tokens_per_s']:,.0f} "
            f"| **{s['speedup']:.2f}x** | {_verdict(s['speedup'], s['target'])} "
            f"| {100 * s['reference_padding_fraction']:.0f}% | {s['min_cosine']:.4f} |"
        )
    if any(r.get("mfu") is not None for r in rows):
        lines += ["", _ceilings(result) + " Model FLOPs utilisation (model matmul FLOPs/s over the ceiling of the path's precision):"]
        lines += ["", "| shape | path | model TFLOP/s | MFU |", "|---|---|---|---|"]
        lines += [
            f"| {r['shape']} | {r['method']} | {r['model_tflops_per_s']:.0f} | {100 * r['mfu']:.0f}% |"
            for r in rows
            if r.get("mfu") is not None
        ]
    return "\n".join(lines)


def _verdict(speedup: float, target: float | None) -> str:
    """``2x met`` / ``3x missed``; ``no target`` for a shape the issue sets none for."""
    return f"{target:g}x {'met' if speedup >= target else 'missed'}" if target else "no target"


def _ceilings(result: dict) -> str:
    parts = [
        f"{name} {c['tflops']:.0f} TFLOP/s" if c.get("tflops") else f"{name} n/a" for name, c in (result.get("gemm_ceilings") or {}).items()
    ]
    return f"GEMM ceilings measured in the same run: {', '.join(parts)}." if parts else "No GEMM ceiling measured."


#: summary key of each path timed against bf16 packed (``bench_encode.py``), and its label
_VS_PACKED = {"packed-fused": "fused", "packed-fused-graphs": "fused_graphs", "packed-fp8": "fp8"}


def paths_gpu_table(result: dict) -> str:
    """``bench_encode.py --methods ...`` runs that time other paths against bf16 packed: FP8, fused
    layers, CUDA graphs (``fp8-encode``, ``fused-encode``, ``fp8-fused-encode``)."""
    env, rows, config = result["environment"], result["results"], result["config"]
    lines = [
        f"`bench_encode.py{' --quick' if config.get('quick') else ''} --methods {' '.join(config['methods'])}`, {env['card']}, "
        f"{env['date'][:10]}, torch {env['torch']}, triton {env['triton']}, random weights. {_ceilings(result)}",
        "",
        "| shape | path | tokens/s | model TFLOP/s | MFU | vs bf16 packed | target | min cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        for r in (r for r in rows if r["shape"] == s["shape"]):
            versus = s.get(_VS_PACKED.get(r["method"], ""), {})
            speedup = f"**{versus['speedup_vs_packed']:.2f}x**" if versus else "1.00x" if r["method"] == "packed" else "n/a"
            verdict = _verdict(versus["speedup_vs_packed"], versus.get("target")) if versus else ""
            cosine = f"{versus['min_cosine']:.4f}" if versus else ""
            mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "n/a"
            lines.append(
                f"| {s['shape']} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.0f} | {mfu} | {speedup} | {verdict} | {cosine} |"
            )
        lines += [
            f"| {s['shape']} | {method} | not run: {note} | | | | | |" for method, note in s.get("notes", {}).items() if "not run" in note
        ]
    return "\n".join(lines)


def train_gpu_table(result: dict) -> str:
    """``bench_train.py`` on a GPU: our MNTP / SimCSE steps against plain transformers + peft, with the
    targets ``suite_summary.py`` judges."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from suite_summary import TRAIN_MEMORY_TARGET, TRAIN_SPEEDUP_TARGET

    def tokens_per_s(value: float | None) -> str:
        return f"{value:,.0f}" if value is not None else "n/a"  # an errored case has no figure

    lines = [
        f"`bench_train.py{' --fused 1' if result.get('fused') else ''}`, {result['device']}, {_date(result)}, {result['model']}, "
        f"{result['dtype']}, LoRA {result['lora']}; {result['steps']} timed steps per case:",
        "",
        "| stage | ours tokens/s | plain HF tokens/s | speed-up | peak memory vs plain HF |",
        "|---|---|---|---|---|",
    ]
    for stage, s in result["summary"].items():
        by = {c["impl"]: c for c in result["cases"] if c["stage"] == stage and "tokens_per_s" in c}
        ours, plain = by.get("ours", {}).get("tokens_per_s"), by.get("plain_hf", {}).get("tokens_per_s")
        memory = f"{s['peak_mem_ratio']:.2f}x" if s.get("peak_mem_ratio") is not None else "n/a"
        lines.append(
            f"| {stage} | {tokens_per_s(ours)} | {tokens_per_s(plain)} | **{s['speedup_tokens_per_s']:.2f}x** "
            f"(target {TRAIN_SPEEDUP_TARGET:g}x) | {memory} (target {TRAIN_MEMORY_TARGET:g}x) |"
        )
    return "\n".join(lines)


def onnx_cuda_gpu_line(result: dict) -> str:
    """``bench_onnx_cuda.py``: the fp16 export under ONNX Runtime's CUDA provider, or why it did not run."""
    if "skipped" in result:
        return f"`bench_onnx_cuda.py` (ONNX Runtime on CUDA) did not run on this card: {result['skipped']}."
    by = {r["method"]: r for r in result["results"]}
    s = result["summary"]
    return (
        f"`bench_onnx_cuda.py`: the fp16 export of {result['shape']} random weights under ONNX Runtime's CUDA provider, "
        f"{by['onnx-cuda-fp16']['tokens_per_s']:,.0f} tokens/s against torch packed {result['torch_dtype']} "
        f"{by['torch-packed']['tokens_per_s']:,.0f}: **{s['onnx_vs_torch_tokens_per_s']:.2f}x**, min cosine {s['min_cosine']:.4f}."
    )


def attention_gpu_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"`bench_attention.py`, {c['dtype']}, Hq={c['heads']} Hkv={c['kv_heads']} D={c['head_dim']}, "
        f"{c['total_tokens']} tokens per shape; TFLOP/s (forward / forward+backward):",
        "",
        "| shape | triton varlen | SDPA flash | SDPA cuDNN | SDPA 4D mask | fwd vs cuDNN | fwd+bwd vs flash |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio in result["ratios"]:
        by = {r["method"]: r for r in result["results"] if r["shape"] == ratio["shape"]}

        def cell(method: str) -> str:
            r = by.get(method)
            return f"{r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f}" if r and r.get("fwd_tflops") else "n/a"

        lines.append(
            f"| {ratio['shape']} | {cell('triton-varlen')} | {cell('sdpa-flash')} | {cell('sdpa-cudnn')} | {cell('sdpa-mask4d')} "
            f"| {ratio['fwd_vs_cudnn']:.2f}x | {ratio['fwd_bwd_vs_flash']:.2f}x |"
        )
    return "\n".join(lines)


def pooling_gpu_table(result: dict) -> str:
    rows = result["results"]
    lines = [
        f"`bench_pooling.py`, {result['config']['dtype']}; forward GB/s of the bytes a pooling must move "
        "(a device copy moves read + write):",
        "",
        "| layout | mode | triton ms | triton GB/s | vs copy | torch reference ms | vs torch reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] != "triton":
            continue
        ref = next((x for x in rows if x["layout"] == r["layout"] and x["mode"] == r["mode"] and x["method"] == "torch-ref"), None)
        vs_ref = f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x" if ref else "n/a"
        ref_ms = f"{ref['fwd_ms']:.3f}" if ref else "n/a"
        # `last` reads one row per sequence: bandwidth against a full copy says nothing about it
        vs_copy = "n/a" if r["mode"] == "last" else f"{r['fwd_vs_copy']:.2f}"
        lines.append(f"| {r['layout']} | {r['mode']} | {r['fwd_ms']:.3f} | {r['fwd_gbps']:.0f} | {vs_copy} | {ref_ms} | {vs_ref} |")
    return "\n".join(lines)


def first_embedding_gpu_line(result: dict) -> str:
    cold, warm = result["runs"]["cold"], result["runs"]["warm"]
    return (
        f"`bench_first_embedding.py`: time to the first embedding of a fresh process ({result['shape']} shapes, "
        f"{cold['n_inputs']} inputs of lengths {min(cold['lengths'])}..{max(cold['lengths'])}): "
        f"**{cold['first_embedding_s']:.1f} s** with an empty Triton cache (compile + autotune), "
        f"**{warm['first_embedding_s']:.1f} s** with the cache of a previous process; steady state {warm['steady_s']:.2f} s."
    )


def fp8_load_gpu_line(result: dict) -> str:
    """``bench_fp8_load.py``: what an FP8 load adds to the bf16 load."""
    v = result["variants"]
    names = {"nearest": "rounded to nearest", "gptq": "GPTQ-rounded", "default": "GPTQ + layer calibration (the default)"}
    parts = [f"{names.get(k, k)} **{x['seconds']:.1f} s**" for k, x in v.items()]
    return (
        f"`bench_fp8_load.py`: seconds `apply_fp8` adds to a bf16 load ({result['shape']} random weights, "
        f"{result['gptq_inputs']} GPTQ inputs, {result['calibration_inputs']} calibration inputs): {', '.join(parts)}."
    )


def gpu_results(results: Path) -> str:
    """All GPU-suite tables, one block per card."""
    blocks = []
    for slug in _card_slugs(results):
        parts = []
        for name, render in (
            ("encode", encode_gpu_table),
            ("attention", attention_gpu_table),
            ("pooling", pooling_gpu_table),
            ("first-embedding", first_embedding_gpu_line),
            ("fp8-encode", paths_gpu_table),
            ("fused-encode", paths_gpu_table),
            ("fp8-fused-encode", paths_gpu_table),
            ("train", train_gpu_table),
            ("train-fused", train_gpu_table),
            ("onnx-cuda", onnx_cuda_gpu_line),
            ("fp8-load", fp8_load_gpu_line),
        ):
            data = _load(results / f"{name}-{slug}.json")
            if data is not None:
                parts.append(render(data))
        blocks.append("\n\n".join(parts))
    return "\n\n".join(blocks) if blocks else "(no GPU results yet: run `bash benchmarks/gpu_suite.sh` on a GPU)"


def script_table(script: str, function: str = "render_table") -> Callable[[dict], str]:
    """The table renderer of ``benchmarks/<script>.py``: that script owns its table (and prints it)."""

    def render(result: dict) -> str:
        import importlib
        import sys

        sys.path.insert(0, str(ROOT / "benchmarks"))
        return getattr(importlib.import_module(script), function)(result)

    return render


def int8_gemm_table(result: dict) -> str:
    lines = [
        f"{result['cpu']} ({', '.join(result['cpu_flags'])}), {result['threads']} threads, M = {result['rows'][0]['m']} rows, "
        f"load average {result['load_before']:.2f} before the run; speed-up vs ONNX Runtime's fp32 `MatMul` in the same run.",
        "",
        "| decoder MatMul | M x K x N | fp32 ms | fp32 GFLOP/s | `MatMulIntegerToFloat` | `DynamicQuantizeMatMul` |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['matmul']} | {r['m']} x {r['k']} x {r['n']} | {r['fp32_ms']:.2f} | {r['fp32_gflops']:.0f} | "
            f"{r['MatMulIntegerToFloat_speedup']:.2f}x | {r['DynamicQuantizeMatMul_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def recipe_sts_table(result: dict) -> str:
    """STS-B dev Spearman of the default model before and after the recipe (``recipe_sts.py``)."""
    c, s = result["config"], result["stsb_dev_spearman"]
    mntp, simcse = c["mntp"], c["simcse"]
    lines = [
        f"{result['model']}, STS-B dev ({c['eval']['pairs']} pairs), CPU, {result['torch_threads']} threads, "
        f"{result['minutes']:.1f} minutes in all, {result.get('date', 'date not recorded')[:10]}. Training text: {c['training_text']}; "
        f"MNTP {mntp['max_steps']} steps, batch {mntp['batch_size']}, lr {mntp['lr']:g}; "
        f"SimCSE {simcse['max_steps']} steps, batch {simcse['batch_size']}, lr {simcse['lr']:g}; max length "
        f"{simcse['max_length']}, seed {simcse['seed']}.",
        "",
        "| encoder | STS-B dev Spearman x 100 |",
        "|---|---|",
    ]
    names = {
        "causal_mean": "causal, mean pooling",
        "causal_weighted_mean": "causal, weighted-mean pooling",
        "bidir_untrained": "bidirectional, untrained",
        "mntp": "bidirectional + MNTP",
        "mntp_simcse": "bidirectional + MNTP + SimCSE",
    }
    lines += [f"| {names.get(k, k)} | {v:.2f} |" for k, v in s.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ headline summary
def _cpu_label(result: dict) -> str:
    threads = result.get("threads") or (result.get("config") or {}).get("threads") or (result.get("settings") or {}).get("threads")
    name = result.get("cpu") or "CPU"
    flags = f" ({', '.join(result['cpu_flags'])})" if result.get("cpu_flags") else ""
    return f"{name}{flags}, {threads} threads, {_date(result)}"


def _date(result: dict) -> str:
    """The day a result was measured (``environment.date`` or ``date``), or says it was not recorded."""
    date = (result.get("environment") or {}).get("date") or result.get("date")
    return date[:10] if date else "date not recorded"


def _gpu_label(result: dict) -> str:
    env = result["environment"]
    return f"{env['card']}, {env['date'][:10]}"


def _summary_rows(results: Path) -> list[tuple[str, str, str]]:
    """``(result, value, measured on)`` for every headline whose JSON exists."""
    rows = []
    for slug in _card_slugs(results):
        encode = _load(results / f"encode-{slug}.json")
        if encode:
            by = {s["shape"]: s for s in encode["summary"]}
            rows.append(
                (
                    "packed encode vs the padded, length-sorted SDPA path (" + " / ".join(by) + " shapes, bf16)",
                    " / ".join(f"{s['speedup']:.2f}x" for s in by.values()),
                    _gpu_label(encode),
                )
            )
        attention = _load(results / f"attention-{slug}.json")
        mixed = [r for r in (attention or {}).get("ratios", []) if r["shape"].startswith("mix")]
        if mixed:
            rows.append(
                (
                    f"varlen attention forward+backward vs SDPA flash on a padded batch, mixed lengths {mixed[0]['shape'][len('mix ') :]}",
                    f"{mixed[0]['fwd_bwd_vs_flash']:.1f}x",
                    _gpu_label(attention),
                )
            )
        first = _load(results / f"first-embedding-{slug}.json")
        if first:
            cold, warm = first["runs"]["cold"], first["runs"]["warm"]
            rows.append(
                (
                    f"first embedding of a fresh process ({first['shape']} shapes), warm / cold Triton cache",
                    f"{warm['first_embedding_s']:.1f} s / {cold['first_embedding_s']:.1f} s",
                    _gpu_label(first),
                )
            )
    recipe = _load(results / "recipe_sts.json")
    if recipe:
        s = recipe["stsb_dev_spearman"]
        rows.append(
            (
                "STS-B dev Spearman, default model: untrained bidirectional -> MNTP + SimCSE (best causal pooling)",
                f"{s['bidir_untrained']:.1f} -> **{s['mntp_simcse']:.1f}** ({max(s['causal_mean'], s['causal_weighted_mean']):.1f})",
                f"CPU, {recipe['torch_threads']} threads, {_date(recipe)}",
            )
        )
    shipped = _load(results / "recipe_default.json")
    if shipped and shipped.get("complete"):
        best = shipped["stsb_dev_spearman"]["best_by_dev"]
        rows.append(
            (
                f"STS-B dev Spearman of the shipped default encoder (`from_pretrained()`, SimCSE step {best['simcse_step']})",
                f"**{best['dev_1500_pairs']:.2f}**",
                f"CPU, {shipped['torch_threads']} thread(s), {_date(shipped)}",
            )
        )
    trained = _load(results / "onnx-cpu-trained.json")  # the shipped default encoder; else the untrained base
    onnx, which = (trained, "shipped default encoder") if trained else (_load(results / "onnx-cpu.json"), "untrained base model")
    if onnx:
        rows += _onnx_rows(onnx, which)
    avx2 = _load(results / "onnx-cpu-trained-epyc-zen3.json")  # no VNNI: OpenVINO runs int8-openvino in fp32 there
    if avx2:
        rows += _onnx_rows(avx2, "shipped default encoder, AVX2-only CPU")
    serve = _load(results / "serve-cpu.json")
    if serve and "servers" in serve:
        s = serve["summary"]
        peer = f", {s['vs_peer']:.2f}x the peer server" if s.get("vs_peer") else ""
        rows.append(
            (
                f"server at {s['highest_concurrency']} clients: texts/s over direct `encode()` (target {s['vs_direct_encode_target']:.2f})",
                f"{s['vs_direct_encode']:.2f}x{peer}",
                _cpu_label(serve),
            )
        )
    elif serve:  # written before the peer comparison
        rows.append(
            (
                f"server throughput, {serve['summary']['speedup_of']} (dynamic batching)",
                f"{serve['summary']['speedup']:.2f}x",
                _cpu_label(serve),
            )
        )
    dataset = _load(results / "encode_dataset-cpu.json")
    if dataset:
        rows.append(
            (
                "`encode_dataset` (Parquet shards, resumable) time over `encode()` of the same texts",
                f"{dataset['summary']['overhead_ratio']:.2f}x",
                _cpu_label(dataset),
            )
        )
    return rows


def _onnx_rows(onnx: dict, which: str) -> list[tuple[str, str, str]]:
    """The int8 exports of one ``bench_onnx.py`` result against torch fp32 (and ONNX Runtime fp32)."""
    rows = []
    by_engine = {r["engine"]: r for r in onnx["results"]}
    onnx_fp32 = by_engine.get("onnx-fp32")
    for engine, label in (("onnx-int8", "ONNX Runtime int8"), ("openvino-int8-openvino", "int8-openvino export under OpenVINO")):
        int8 = by_engine.get(engine)
        if not int8:
            continue
        layers = f", {int8['int8_layers']}/{int8['layers']} layers int8" if "int8_layers" in int8 else ""
        vs_ort = f", {int8['sentences_per_s'] / onnx_fp32['sentences_per_s']:.2f}x ONNX Runtime fp32" if onnx_fp32 else ""
        rows.append(
            (
                f"{label} vs torch fp32 `encode()`, {which} (min cosine plain / instructions)",
                f"{int8['speedup_vs_torch_fp32']:.2f}x{vs_ort} ({int8['min_cos']:.3f} / {int8['min_cos_instructions']:.3f}{layers})",
                _cpu_label(onnx),
            )
        )
    return rows


def summary_table(results: Path) -> str:
    """The headline results, one row per results file, each naming where and when it was measured."""
    rows = _summary_rows(results)
    if not rows:
        return "(no results yet: run the benchmarks, see docs/benchmarks.md)"
    lines = ["| result | value | measured on |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {where} |" for what, value, where in rows]
    return "\n".join(lines)


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "int8-gemm-cpu": ("int8-gemm-cpu.json", int8_gemm_table),
    "int8-levers": ("int8-levers.json", script_table("int8_levers")),
    "int8-levers-trained": ("int8-levers-trained.json", script_table("int8_levers")),
    "int8-levers-qat": ("int8-levers-qat.json", script_table("int8_levers")),
    "int8-perturbation-epyc-zen3": ("int8-perturbation-epyc-zen3.json", script_table("int8_perturbation")),
    "serve-cpu": ("serve-cpu.json", serve_table),
    "encode_dataset-cpu": ("encode_dataset-cpu.json", dataset_table),
    "recipe-sts": ("recipe_sts.json", recipe_sts_table),
    "recipe-matryoshka": ("recipe_matryoshka.json", script_table("recipe_matryoshka", "markdown_table")),
    "fp8-fidelity": ("fp8-fidelity-cpu.json", script_table("bench_fp8_fidelity", "markdown_table")),
}


def update_page(page: Path, results: Path = RESULTS) -> None:
    """Rewrite every generated block of ``page`` (markers it does not have are skipped)."""
    text = page.read_text()
    for marker, (file, render) in TABLES.items():
        path = results / file
        body = render(json.loads(path.read_text())) if path.is_file() else f"(no `benchmarks/results/{file}` yet: run the command above)"
        text = replace_between_markers(text, marker, body)
    text = replace_between_markers(text, "gpu-results", gpu_results(results))
    text = replace_between_markers(text, "summary", summary_table(results))
    page.write_text(text)


if __name__ == "__main__":
    for page in PAGES:
        update_page(page)
        print(f"updated {page.relative_to(ROOT)}")
