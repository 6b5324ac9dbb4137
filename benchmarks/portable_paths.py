"""Paths as results files record them: never a machine's absolute path in a committed JSON.

A path inside the repository is recorded relative to its root (``runs/recipe_sts/mntp/adapter``), a
folder of the llm2vec-fast cache by its name there (``SmolLM2-135M-Instruct (llm2vec-fast cache)``),
any other absolute path by its last three parts (``.../recipe_run/mntp/adapter``): enough to tell
adapters apart, nothing about the machine. ``tests/test_repo_hygiene.py`` rejects committed files
that still hold one.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cache_dir() -> Path:
    from llm2vec_fast.default_model import cache_dir  # the package may be absent when only tables are rendered

    return cache_dir().resolve()


def portable_path(path: str | os.PathLike | None, root: Path = ROOT) -> str | None:
    """``path`` as a results file records it (see the module docstring); ``None`` stays ``None``."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    p = p.resolve()
    if p.is_relative_to(root.resolve()):
        return p.relative_to(root.resolve()).as_posix()
    try:
        cache = _cache_dir()
    except ImportError:
        cache = None
    if cache is not None and p.is_relative_to(cache):
        return f"{p.relative_to(cache).as_posix()} (llm2vec-fast cache)"
    return ".../" + "/".join(p.parts[-3:])


def portable_argv(argv: list[str], root: Path = ROOT) -> list[str]:
    """``argv`` with every absolute path (also in ``--opt=/abs/path``) made portable."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        out.append(f"{key}{eq}{portable_path(value, root)}" if os.path.isabs(value) else arg)
    return out
