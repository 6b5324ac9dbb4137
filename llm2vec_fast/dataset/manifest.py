"""``manifest.json`` beside the shards: the job's settings (checked on resume), the model and its
dimension, the inputs, per-shard row counts, skipped rows, total time and tokens.

It is written when a job starts (``"complete": false``) so a rerun can compare settings, and again,
complete, by rank 0 once every rank has finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .writer import is_temporary, read_shard_meta, shard_name

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class SettingsMismatchError(ValueError):
    """The output folder holds a job with other settings (model, fields, chunking, inputs, ...)."""


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); use overwrite=True / --overwrite to start again") from None


def write_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / MANIFEST
    tmp = out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable ``key: old != new`` lines between two settings dicts (nested; lists of the same
    length entry by entry, so a changed input file is named with what changed in it)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
            for i, (x, y) in enumerate(zip(a, b)):
                if isinstance(x, dict) and isinstance(y, dict):
                    label = f" ({x['path']})" if x.get("path") == y.get("path") and "path" in x else ""
                    out += differences(x, y, f"{prefix}{key}[{i}]{label}.")
                elif x != y:
                    out.append(f"{prefix}{key}[{i}]: {_short(x)} != {_short(y)}")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} != {_short(b)}")
    return out


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 120 else s[:117] + "..."


def prepare_output(out_dir: Path, settings: dict, overwrite: bool) -> None:
    """Create ``out_dir``; with ``overwrite`` delete a previous job's files (only ours); else refuse a
    previous job with other settings, naming each difference. Removes stale temporary shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = read_manifest(out_dir) if not overwrite else None
    ours = [
        p
        for p in out_dir.iterdir()
        if p.name == MANIFEST
        or (p.name.startswith("part-") and p.suffix == ".parquet")
        or is_temporary(p.name)
        or p.name.startswith(f".{MANIFEST}.tmp-")
    ]
    if overwrite:
        for p in ours:
            p.unlink()
        return
    if old is None and any(p.name.startswith("part-") for p in ours):
        raise ValueError(f"{out_dir} holds shards but no {MANIFEST}; use overwrite=True / --overwrite to start again")
    if old is not None:
        diff = differences(old.get("settings", {}), settings)
        if diff:
            raise SettingsMismatchError(
                f"{out_dir} holds a job with other settings ({'; '.join(diff)}); rerun with the same settings to "
                "resume, or use overwrite=True / --overwrite to start again"
            )
    for p in ours:
        if is_temporary(p.name) or p.name.startswith(f".{MANIFEST}.tmp-"):
            p.unlink()  # a shard that was being written when the last run died


def finished_chunks(out_dir: Path, num_chunks: int, expected_rows) -> dict[int, dict]:
    """Metadata of each complete shard (right name, readable, the expected row count)."""
    done = {}
    for chunk in range(num_chunks):
        path = out_dir / shard_name(chunk)
        if path.is_file():
            meta = read_shard_meta(path)
            if meta is not None and meta.get("chunk") == chunk and meta["rows"] == expected_rows(chunk):
                done[chunk] = meta
    return done
