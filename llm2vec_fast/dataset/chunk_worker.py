"""The work of a worker: read a group of chunks, embed their rows with the encoder, write one shard
per chunk.

Used by every engine (one process, each torchrun rank, each Ray actor), so the output does not
depend on the engine. Embeddings come from ``encoder.tokenize`` + ``encoder.embed_items``: the same
tokenisation and length-sorted batches as ``LLM2Vec.encode``. Small chunks are embedded together, up
to :data:`SORT_WINDOW_ROWS` rows under one length sort, so cutting a dataset into small chunks does
not add padding (a 75-row chunk sorted on its own pushed 1.22x the padded tokens of one global sort
through the model on STS-B). Shards are written on a background thread while the next group is
embedded.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .plan import InputFile, Plan, bad_row_reason, describe_row, segments
from .readers import MISSING, Fields, iter_rows
from .writer import ShardWriter

#: batches per progress update (and per ``embed_items`` call)
BATCHES_PER_UPDATE = 4
#: rows embedded under one length sort (several chunks when they are smaller). On STS-B sentences in
#: batches of 32, a 10k-row window pads within ~1% of one global sort; a group's shards appear when
#: the group is done, so a killed worker redoes at most max(chunk_rows, this) rows.
SORT_WINDOW_ROWS = 10_000


def group_size(chunk_rows: int, remaining: int, workers: int) -> int:
    """Chunks a worker takes at once: enough to fill the sort window, but at most an even share of
    the ``remaining`` chunks, so every worker gets some and shares shrink towards the end (guided
    scheduling)."""
    window = max(1, SORT_WINDOW_ROWS // chunk_rows)
    return max(1, min(window, -(-remaining // max(1, workers))))


@dataclass(frozen=True)
class JobOptions:
    """What a job does with each row (all engines, all ranks)."""

    fields: Fields
    instruction: str | None = None  # the same instruction for every row
    dtype_out: str = "float32"
    batch_size: int = 32


class _Cursor:
    """A reader of one file that only moves forward, so a rank reading its chunks in increasing
    order reads each file at most once (line formats and Parquet seek anyway)."""

    def __init__(self, file: InputFile, fields: Fields):
        self.file, self.fields = file, fields
        self.rows: Iterator | None = None
        self.position = 0

    def take(self, start: int, stop: int) -> list:
        seekable = self.file.format == "parquet" or start in self.file.offsets  # row groups / recorded byte offsets
        if self.rows is None or start < self.position or (start > self.position and seekable):
            offset = self.file.offsets.get(start)
            self.rows = iter_rows(Path(self.file.path), self.file.format, self.fields, start, offset)
            self.position = start
        if start > self.position:
            for _ in itertools.islice(self.rows, start - self.position):
                pass
        out = list(itertools.islice(self.rows, stop - start))
        if len(out) != stop - start:
            raise RuntimeError(f"{self.file.path}: has fewer rows than when the job was planned (changed since?)")
        self.position = stop
        return out

    def close(self) -> None:
        if self.rows is not None and hasattr(self.rows, "close"):
            self.rows.close()  # closes the file of a line-based reader
        self.rows = None


class ChunkWorker:
    """Encodes chunks of ``plan`` with ``encoder`` into ``out_dir``. Call :meth:`flush` (or
    :meth:`close`) before relying on the shards of the last group."""

    def __init__(self, encoder, plan: Plan, options: JobOptions, out_dir: Path):
        self.encoder, self.plan, self.options, self.out_dir = encoder, plan, options, Path(out_dir)
        self._cursors: dict[str, _Cursor] = {}
        self._writer = ShardWriter()
        encoder._before_encode(None)  # eval mode, as encode() does

    def read_chunk(self, chunk: int) -> tuple[list, list]:
        """Ids and encoder inputs (texts or ``[instruction, text]`` pairs) of the chunk's good rows."""
        start, stop = self.plan.chunk_range(chunk)
        skipped = self.plan.skipped_in(start, stop)
        fields, instruction = self.options.fields, self.options.instruction
        ids, inputs = [], []
        for path in [p for p, c in self._cursors.items() if c.file.first_row + c.file.rows <= start]:
            self._cursors.pop(path).close()  # files before this chunk: a rank's chunks only move forward
        for file, lo, hi in segments(self.plan, start, stop):
            cursor = self._cursors.setdefault(file.path, _Cursor(file, fields))
            for file_row, (text, row_id, row_instruction) in enumerate(cursor.take(lo, hi), start=lo):
                row = file.first_row + file_row
                if row in skipped:
                    continue
                reason = bad_row_reason(text, row_id, row_instruction, fields)
                if reason is not None:
                    raise RuntimeError(
                        f"{describe_row(file, file_row)}: {reason}, but it was fine when the job was planned (changed since?)"
                    )
                ids.append(row if self.plan.id_type == "row" else (str(row_id) if self.plan.id_type == "string" else row_id))
                if fields.instruction is not None:
                    row_instruction = "" if row_instruction in (None, MISSING) else row_instruction
                    inputs.append([row_instruction, text] if row_instruction else text)
                elif instruction:
                    inputs.append([instruction, text])
                else:
                    inputs.append(text)
        return ids, inputs

    def embed(self, inputs: list, on_progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 ``[n, dim]`` embeddings of ``inputs``, each input's token count, and the tokens each
        took in its forward pass (padding included, see ``forward_lengths``). Inputs are sorted by
        length once and embedded a few batches at a time (same batches as ``encode``)."""
        dim = int(self.encoder.hidden_size)
        if not inputs:
            empty = np.zeros(0, dtype=np.int64)
            return np.zeros((0, dim), dtype=np.float32), empty, empty
        items = self.encoder.tokenize(inputs)
        lengths = np.array([len(x.input_ids) for x in items], dtype=np.int64)
        order = sorted(range(len(items)), key=lambda i: -lengths[i])
        out = np.empty((len(items), dim), dtype=np.float32)
        step = self.options.batch_size * BATCHES_PER_UPDATE
        for lo in range(0, len(order), step):
            idx = order[lo : lo + step]
            out[idx] = self.encoder.embed_items([items[i] for i in idx], self.options.batch_size, show_progress_bar=False).numpy()
            if on_progress is not None:
                on_progress(len(idx), int(lengths[idx].sum()))
        return out, lengths, self.encoder.forward_lengths(items, self.options.batch_size)

    def run_chunks(self, chunks: list[int], on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """Encode ``chunks`` together (one length sort) and queue one shard per chunk for writing;
        returns each shard's metadata."""
        t0 = time.perf_counter()
        parts = [self.read_chunk(c) for c in chunks]
        embeddings, lengths, forward = self.embed([x for _, inputs in parts for x in inputs], on_progress)
        seconds = time.perf_counter() - t0
        total_tokens = max(1, int(lengths.sum()))
        self._writer.wait()  # the previous group's shards: at most one group waits to be written
        metas, lo = [], 0
        for chunk, (ids, _) in zip(chunks, parts):
            hi = lo + len(ids)
            tokens = int(lengths[lo:hi].sum())
            meta = {
                "first_row": self.plan.chunk_range(chunk)[0],
                "tokens": tokens,
                "forward_tokens": int(forward[lo:hi].sum()),
                "seconds": round(seconds * tokens / total_tokens, 4),  # the chunk's share of its group's time
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
            self._writer.submit(self.out_dir, chunk, ids, self.plan.id_type, embeddings[lo:hi], self.options.dtype_out, meta)
            metas.append({**meta, "chunk": chunk, "rows": len(ids)})
            lo = hi
        return metas

    def run(self, chunk: int, on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Encode and write one chunk; returns the shard's metadata."""
        meta = self.run_chunks([chunk], on_progress)[0]
        self.flush()
        return meta

    def flush(self) -> None:
        """Wait until every queued shard is written (raises a write's error)."""
        self._writer.wait()

    def close(self) -> None:
        """Finish queued writes (their chunks are complete) and stop the writer thread; close files."""
        self._writer.close()
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()
