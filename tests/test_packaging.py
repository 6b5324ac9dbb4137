"""Packaging: one import package; kernels/ and export/ install under llm2vec_fast only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_subpackages_import_and_no_top_level_modules(tmp_path):
    out = _run(
        "import importlib.util, llm2vec_fast.kernels as k, llm2vec_fast.export as e;"
        "print(importlib.util.find_spec('kernels'), importlib.util.find_spec('export'), k.__name__, e.__name__)",
        cwd=tmp_path,  # outside the repo, so the source folders are not on sys.path
    )
    assert out == "None None llm2vec_fast.kernels llm2vec_fast.export"


def test_wheel_contains_only_llm2vec_fast(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("llm2vec_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"llm2vec_fast"}
    assert "llm2vec_fast/kernels/__init__.py" in names and "llm2vec_fast/export/__init__.py" in names
