"""Output shards: one Parquet file per chunk, columns ``id`` and ``embedding`` (fixed-size list).

A shard is written under a temporary name and renamed when complete, so a file with the final
name is always whole. Its Parquet key-value metadata records the chunk, its rows and tokens, so a
resumed job (and the manifest) can trust finished shards without re-reading them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DTYPES_OUT = ("float32", "float16")
SHARD_META_KEY = b"llm2vec_fast.shard"
TMP_MARK = ".tmp-"


def shard_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def is_temporary(name: str) -> bool:
    return name.startswith(".part-") and TMP_MARK in name


def write_shard(out_dir: Path, chunk: int, ids: list, id_type: str, embeddings: np.ndarray, dtype_out: str, meta: dict) -> Path:
    """Write ``part-<chunk>.parquet`` atomically (temporary name, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dtype_out not in DTYPES_OUT:
        raise ValueError(f"dtype_out must be one of {DTYPES_OUT}, got {dtype_out!r}")
    dim = int(embeddings.shape[1])
    values = pa.array(np.ascontiguousarray(embeddings, dtype=np.dtype(dtype_out)).reshape(-1))
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.string() if id_type == "string" else pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
        }
    )
    table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps({**meta, "chunk": chunk, "rows": len(ids)})})
    final = out_dir / shard_name(chunk)
    tmp = out_dir / f".{final.name}{TMP_MARK}{os.getpid()}"
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_shard_meta(path: Path) -> dict | None:
    """The metadata of a finished shard, or ``None`` when the file is unreadable."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        meta = json.loads(pf.schema_arrow.metadata[SHARD_META_KEY])
        if int(pf.metadata.num_rows) != int(meta["rows"]):
            return None
        return meta
    except Exception:  # truncated or foreign file: redo the chunk
        return None


class ShardWriter:
    """Writes shards (:func:`write_shard`) on one background thread, so Parquet encoding and fsync
    overlap the next forward passes (a 10k-row chunk of 4096-dim embeddings is 160 MiB to encode and
    sync). :meth:`wait` blocks until everything submitted is on disk and raises the first write error;
    callers wait before queueing the next group, so at most one group's embeddings wait in memory."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm2vec-fast-shard-writer")
        self._pending: list = []

    def submit(self, *args) -> None:
        """Queue ``write_shard(*args)``."""
        self._pending.append(self._pool.submit(write_shard, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]  # waits for each; every queued shard is tried
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        """Finish the queued writes (errors ignored: the caller is failing or has waited) and stop."""
        self._pool.shutdown(wait=True)
        self._pending = []
