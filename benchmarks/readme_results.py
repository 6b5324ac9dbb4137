"""Regenerate the README's CPU result tables (serve, dataset, recipe Matryoshka) from their JSON.

    python benchmarks/readme_results.py          # rewrites the text between the README markers

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; a missing JSON leaves a
note instead, so the README never shows a number that no results file holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def replace_between_markers(text: str, marker: str, body: str) -> str:
    """``text`` with the part between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` set to ``body``
    (unchanged when the markers are absent)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def serve_table(result: dict) -> str:
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
        f"{s['ranks']} ranks vs 1 process: {summary['speedup_2_ranks_vs_1_proc']:.2f}x.",
        "",
        "| method | seconds | rows/s | tokens/s | min cos vs encode() |",
        "|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['method']} | {r['seconds']:.2f} | {r['rows_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['min_cosine_vs_encode']:.6f} |"
        )
    return "\n".join(lines)


def matryoshka_table(result: dict) -> str:
    """recipe_matryoshka.py owns its table (also printed by its --table)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipe_matryoshka import markdown_table

    return markdown_table(result)


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "serve-cpu": ("serve-cpu.json", serve_table),
    "encode_dataset-cpu": ("encode_dataset-cpu.json", dataset_table),
    "recipe-matryoshka": ("recipe_matryoshka.json", matryoshka_table),
}


def update_readme(readme: Path = README, results: Path = RESULTS) -> None:
    text = readme.read_text()
    for marker, (file, render) in TABLES.items():
        path = results / file
        body = render(json.loads(path.read_text())) if path.is_file() else f"(no `benchmarks/results/{file}` yet: run the command above)"
        text = replace_between_markers(text, marker, body)
    readme.write_text(text)


if __name__ == "__main__":
    update_readme()
    print(f"updated {README}")
