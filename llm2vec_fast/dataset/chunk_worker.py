"""One unit of work: read a chunk's rows, embed them with the encoder, write its shard.

Used by every engine (one process, each torchrun rank, each Ray actor), so the output does not
depend on the engine. Embeddings come from ``encoder.tokenize`` + ``encoder.embed_items``: the same
tokenisation and length-sorted batches as ``LLM2Vec.encode``.
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
from .writer import write_shard

#: batches per progress update (and per ``embed_items`` call)
BATCHES_PER_UPDATE = 4


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
    """Encodes chunks of ``plan`` with ``encoder`` into ``out_dir``."""

    def __init__(self, encoder, plan: Plan, options: JobOptions, out_dir: Path):
        self.encoder, self.plan, self.options, self.out_dir = encoder, plan, options, Path(out_dir)
        self._cursors: dict[str, _Cursor] = {}
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
                    raise RuntimeError(f"{describe_row(file, file_row)}: {reason}, but it was fine when the job was planned (changed since?)")
                ids.append(row if self.plan.id_type == "row" else (str(row_id) if self.plan.id_type == "string" else row_id))
                if fields.instruction is not None:
                    row_instruction = "" if row_instruction in (None, MISSING) else row_instruction
                    inputs.append([row_instruction, text] if row_instruction else text)
                elif instruction:
                    inputs.append([instruction, text])
                else:
                    inputs.append(text)
        return ids, inputs

    def embed(self, inputs: list, on_progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
        """float32 ``[n, dim]`` embeddings of ``inputs`` and their token count. Inputs are sorted by
        length once and embedded a few batches at a time (same batches as ``encode``)."""
        dim = int(self.encoder.hidden_size)
        if not inputs:
            return np.zeros((0, dim), dtype=np.float32), 0
        items = self.encoder.tokenize(inputs)
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
        out = np.empty((len(items), dim), dtype=np.float32)
        step = self.options.batch_size * BATCHES_PER_UPDATE
        tokens = 0
        for lo in range(0, len(order), step):
            idx = order[lo : lo + step]
            group = [items[i] for i in idx]
            out[idx] = self.encoder.embed_items(group, self.options.batch_size, show_progress_bar=False).numpy()
            group_tokens = sum(len(x.input_ids) for x in group)
            tokens += group_tokens
            if on_progress is not None:
                on_progress(len(group), group_tokens)
        return out, tokens

    def run(self, chunk: int, on_progress: Callable[[int, int], None] | None = None) -> dict:
        """Encode and write one chunk; returns the shard's metadata."""
        t0 = time.perf_counter()
        ids, inputs = self.read_chunk(chunk)
        embeddings, tokens = self.embed(inputs, on_progress)
        start, _ = self.plan.chunk_range(chunk)
        meta = {"first_row": start, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 4),
                "host": socket.gethostname(), "pid": os.getpid()}
        write_shard(self.out_dir, chunk, ids, self.plan.id_type, embeddings, self.options.dtype_out, meta)
        return {**meta, "chunk": chunk, "rows": len(ids)}
