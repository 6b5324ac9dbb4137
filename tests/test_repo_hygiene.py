"""Repository habits that CI enforces through ``make test``: ruff lint and format, a strict docs build,
and no machine paths in committed results and docs."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# An absolute path into a home, work or temp folder of some machine. The lookbehind keeps URLs
# (https://host/home/...) and relative or elided paths (runs/tmp/..., .../recipe_run/...) out.
MACHINE_PATH = re.compile(
    r"(?<![\w.~/:-])(?:/(?:root|home|Users|work|tmp|scratch|mnt|var/folders|private/var/folders)/|[A-Za-z]:\\Users\\)"
)
CHECKED_SUFFIXES = (".json", ".md", ".yml", ".yaml", ".toml")


def _tool(name: str) -> str:
    """The tool installed next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev,docs]' (make setup does)")
    return found


def _committed_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in out.split("\0") if name]


def machine_paths(text: str) -> list[str]:
    """The lines of ``text`` that hold an absolute home / work / temp path."""
    return [line.strip() for line in text.splitlines() if MACHINE_PATH.search(line)]


def test_machine_path_pattern():
    for bad in ["/root/.cache/x", '"/work/recipe_run/mntp"', "(/tmp/run)", "C:\\Users\\me\\x", "`/home/u/venv`", "path=/scratch/a/"]:
        assert machine_paths(bad), bad
    for fine in [
        "https://example.com/home/index.html",
        "http://localhost:8080/tmp/",
        "runs/recipe_sts/mntp/adapter",
        ".../recipe_run/mntp/adapter",
        "~/.cache/llm2vec_fast",
        "--output /shared/emb/",
        "$TMPDIR/x",
    ]:
        assert not machine_paths(fine), fine


def test_no_machine_paths_in_committed_files():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    bad = {}
    for path in _committed_files():
        if path.suffix in CHECKED_SUFFIXES and path.is_file():
            hits = machine_paths(path.read_text(encoding="utf-8", errors="replace"))
            if hits:
                bad[str(path.relative_to(ROOT))] = hits[:3]
    assert not bad, f"absolute machine paths (record repo-relative paths or names instead): {bad}"


def test_ruff_check():
    proc = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_format():
    proc = subprocess.run([_tool("ruff"), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout[-4000:] + proc.stderr[-2000:]


def test_docs_build_strict(tmp_path):
    """Broken links, anchors, snippets (examples/, CONTRIBUTING.md) and API references fail the build."""
    proc = subprocess.run(
        [_tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    # a snippet line the build did not recognise shows up as text instead of the example
    pages = {
        p.parent.name: html.unescape(re.sub(r"<[^>]+>", "", p.read_text(encoding="utf-8"))) for p in (tmp_path / "site").rglob("index.html")
    }
    unexpanded = [name for name, text in pages.items() if re.search(r'--8\s*<\s*--\s*"', text)]
    assert not unexpanded, f"snippet lines left as text on: {unexpanded}"
    assert "from llm2vec_fast import LLM2Vec" in pages["encoding"]  # examples/encode.py, included


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the depth into docs/"
