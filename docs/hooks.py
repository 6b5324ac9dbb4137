"""MkDocs hook: publish the benchmark plots (``benchmarks/results/*.png``) as ``results/<name>.png``
so the pages show the files the benchmarks write, without a copy under ``docs/`` that could drift."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files
