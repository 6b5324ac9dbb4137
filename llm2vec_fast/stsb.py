"""STS Benchmark reader and evaluation (Spearman correlation of cosine similarities).

The data lives in ``../shared/data/stsbenchmark/`` relative to the repository root by default;
``$LLM2VEC_FAST_STSB_DIR`` or the ``data_dir`` argument point elsewhere. Files are the original
tab-separated ``sts-{train,dev,test}.csv``: the gold score is column 5, the sentence pair columns
6 and 7 (1-based); they are read with ``csv.QUOTE_NONE`` (sentences contain bare quotes).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

SPLITS = ("train", "dev", "test")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def stsb_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The STS-B folder: ``data_dir``, else ``$LLM2VEC_FAST_STSB_DIR``, else ``<repo>/../shared/data/stsbenchmark``."""
    return _stsb_source(data_dir)[0]


def _stsb_source(data_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """The STS-B folder and what chose it (for error messages)."""
    if data_dir is not None:
        return Path(data_dir), "data_dir (--data-dir)"
    env = os.environ.get("LLM2VEC_FAST_STSB_DIR")
    if env:
        return Path(env), "$LLM2VEC_FAST_STSB_DIR"
    return _REPO_ROOT.parent / "shared" / "data" / "stsbenchmark", "the default (set data_dir / --data-dir or $LLM2VEC_FAST_STSB_DIR)"


def load_stsb(split: str, data_dir: str | os.PathLike | None = None) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` triples of one split (scores in [0, 5])."""
    if split not in SPLITS:
        raise ValueError(f"unknown STS-B split {split!r}; expected one of {SPLITS}")
    folder, source = _stsb_source(data_dir)
    path = folder / f"sts-{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"STS-B file {str(path)!r} not found (folder from {source}); it must hold sts-{split}.csv")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) < 7:
                raise ValueError(f"{path}:{line_no}: expected at least 7 tab-separated columns, got {len(row)}")
            try:
                score = float(row[4])
            except ValueError:
                score = math.nan
            if not 0.0 <= score <= 5.0:  # NaN fails too
                raise ValueError(f"{path}:{line_no}: the score (column 5) must be a number in [0, 5], got {row[4]!r}")
            rows.append((row[5], row[6], score))
    if not rows:
        raise ValueError(f"STS-B file {str(path)!r} is empty")
    return rows


def stsb_sentences(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[str]:
    """The unique sentences of a split in first-seen order (labels unused): unsupervised training text."""
    seen: dict[str, None] = {}
    for a, b, _ in load_stsb(split, data_dir):
        seen.setdefault(a, None)
        seen.setdefault(b, None)
    return list(seen)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get their average rank (``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of the average ranks); NaN where it is undefined,
    as in scipy: a constant input, or a NaN or infinite value (NaN embeddings must not score)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def check_limit(limit: int | None) -> None:
    """A correlation needs two pairs at least."""
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 2):
        raise ValueError(f"limit must be a whole number of pairs, at least 2 (a correlation needs two), got {limit!r}")


def pair_cosines(embed, pairs: list[tuple[str, str, float]]) -> np.ndarray:
    """Cosine similarity of each pair; ``embed(list_of_unique_sentences) -> [N, D]`` array/tensor."""
    unique = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    index = {s: i for i, s in enumerate(unique)}
    emb = np.asarray(embed(unique), dtype=np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    ia = np.array([index[a] for a, _, _ in pairs])
    ib = np.array([index[b] for _, b, _ in pairs])
    return (emb[ia] * emb[ib]).sum(axis=1)


def stsb_spearman(
    encoder,
    split: str = "dev",
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    *,
    truncate_dim: int | None = None,
    instruction: str = "",
) -> float:
    """Spearman x 100 between the gold scores and the cosine similarities of ``encoder.encode``
    embeddings on the first ``limit`` pairs of ``split`` (every pair when ``None``). Each unique
    sentence is encoded once, as ``[instruction, sentence]`` if an instruction is given, and
    truncated to its first ``truncate_dim`` dimensions (Matryoshka) if given."""
    check_limit(limit)
    pairs = load_stsb(split, data_dir)
    if limit is not None:
        pairs = pairs[: int(limit)]

    def embed(sentences):
        inputs = [[instruction, s] for s in sentences] if instruction else sentences
        return encoder.encode(inputs, batch_size=batch_size, convert_to_numpy=True, truncate_dim=truncate_dim)

    cos = pair_cosines(embed, pairs)
    return 100.0 * spearman(cos, [s for _, _, s in pairs])
