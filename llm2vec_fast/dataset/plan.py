"""The plan of a job: which rows exist, how they are cut into chunks, which rows are skipped.

One streaming pass over every input before any encoding: it counts rows, validates every row
(so a malformed file or, under ``on_bad_row="error"``, a bad row fails before any work), records
where each chunk starts in line-based files (so a rank seeks straight to its chunks), and decides
the type of the ``id`` column. Memory is bounded by the number of files, chunks and skipped rows.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .readers import (
    INT64_MAX,
    INT64_MIN,
    MISSING,
    Fields,
    MalformedInputError,
    check_fields,
    detect_format,
    iter_rows,
    line_offsets,
    parquet_num_rows,
)

ON_BAD_ROW = ("error", "skip")


class BadRowError(ValueError):
    """A row whose text (or id) is missing, null, empty or not a string, under ``on_bad_row="error"``."""


@dataclass
class InputFile:
    path: str
    format: str
    rows: int
    bytes: int
    first_row: int  # global position of the file's first row
    offsets: dict[int, int] = field(default_factory=dict)  # file row -> byte offset (chunk starts, line formats)


@dataclass
class Plan:
    files: list[InputFile]
    total_rows: int
    chunk_rows: int
    id_type: str  # "row" (global row number), "int64" or "string"
    skipped: list[dict]  # {"row": global row, "file", "file_row", "reason"}

    @property
    def num_chunks(self) -> int:
        return (self.total_rows + self.chunk_rows - 1) // self.chunk_rows

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.total_rows)

    @functools.cached_property
    def _skipped_rows(self) -> list[int]:
        return [s["row"] for s in self.skipped]  # sorted: rows are planned in order

    def skipped_in(self, start: int, stop: int) -> set[int]:
        """Global rows in ``[start, stop)`` that are skipped."""
        rows = self._skipped_rows
        return set(rows[bisect.bisect_left(rows, start) : bisect.bisect_left(rows, stop)])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        files = [InputFile(**{**f, "offsets": {int(k): v for k, v in f["offsets"].items()}}) for f in data["files"]]
        return cls(**{**data, "files": files})


def bad_row_reason(text, row_id, instruction, fields: Fields) -> str | None:
    """Why a row cannot be encoded, or ``None``."""
    if text is MISSING:
        return f"text field {fields.text!r} is missing"
    if text is None:
        return f"text field {fields.text!r} is null"
    if not isinstance(text, str):
        return f"text field {fields.text!r} is a {type(text).__name__}, not a string"
    if not text.strip():
        return f"text field {fields.text!r} is empty"
    if not _is_unicode(text):
        return f"text field {fields.text!r} is not valid Unicode (a lone surrogate such as an escaped half emoji)"
    if fields.id is not None:
        if row_id is MISSING or row_id is None:
            return f"id field {fields.id!r} is {'missing' if row_id is MISSING else 'null'}"
        if isinstance(row_id, (dict, list)):
            return f"id field {fields.id!r} is a {type(row_id).__name__}, not a scalar"
        if isinstance(row_id, str) and not _is_unicode(row_id):
            return f"id field {fields.id!r} is not valid Unicode (a lone surrogate)"
    if fields.instruction is not None and instruction not in (None, MISSING):
        if not isinstance(instruction, str):
            return f"instruction field {fields.instruction!r} is a {type(instruction).__name__}, not a string"
        if not _is_unicode(instruction):
            return f"instruction field {fields.instruction!r} is not valid Unicode (a lone surrogate)"
    return None


def _is_unicode(value: str) -> bool:
    """Whether ``value`` encodes to UTF-8: JSON's ``"\\ud83d"`` decodes to a lone surrogate, which
    neither the tokenizer nor Parquet accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int64(row_id) -> bool:
    return not isinstance(row_id, bool) and isinstance(row_id, int) and INT64_MIN <= row_id <= INT64_MAX


def describe_row(file: InputFile, file_row: int) -> str:
    where = f"row {file_row}"
    if file.format in ("jsonl", "text"):
        where += " (counting from 0; " + ("non-blank line" if file.format == "jsonl" else "line") + f" {file_row + 1})"
    return f"{file.path}: {where}"


def make_plan(paths: list[Path], fields: Fields, chunk_rows: int, on_bad_row: str, input_format: str | None = None) -> Plan:
    """Read every input once (streaming) and return the :class:`Plan`; raises on a malformed file,
    and on the first bad row when ``on_bad_row="error"``."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    formats = [detect_format(p, input_format) for p in paths]
    for p, fmt in zip(paths, formats):  # cheap schema checks of every file before the long pass
        check_fields(p, fmt, fields)
    files: list[InputFile] = []
    skipped: list[dict] = []
    all_int_ids = True
    first_row = 0
    for p, fmt in zip(paths, formats):
        file = InputFile(path=str(p), format=fmt, rows=0, bytes=os.path.getsize(p), first_row=first_row)
        n = 0
        for n, (text, row_id, instruction) in enumerate(iter_rows(p, fmt, fields), start=1):
            reason = bad_row_reason(text, row_id, instruction, fields)
            if reason is not None:
                if on_bad_row == "error":
                    raise BadRowError(
                        f"{describe_row(file, n - 1)}: {reason} (use on_bad_row='skip' / --on-bad-row skip to skip such rows)"
                    )
                skipped.append({"row": first_row + n - 1, "file": str(p), "file_row": n - 1, "reason": reason})
            elif fields.id is not None and not _is_int64(row_id):
                all_int_ids = False  # a string, a float, or an integer past int64 (uint64 ids): string ids
        file.rows = n
        if fmt in ("jsonl", "text"):  # byte offsets of the chunk starts inside this file
            starts = [c * chunk_rows - first_row for c in _chunks_starting_in(first_row, first_row + n, chunk_rows)]
            counted, file.offsets = line_offsets(p, fmt, starts)
            if counted != n:
                raise MalformedInputError(f"{p}: changed while it was being read")
        elif fmt == "parquet" and n != parquet_num_rows(p):
            raise MalformedInputError(f"{p}: changed while it was being read")
        files.append(file)
        first_row += n
    if first_row == 0:
        raise ValueError(f"the input holds no row ({', '.join(map(str, paths))})")
    id_type = "row" if fields.id is None else ("int64" if all_int_ids else "string")
    return Plan(files=files, total_rows=first_row, chunk_rows=chunk_rows, id_type=id_type, skipped=skipped)


def _chunks_starting_in(start: int, stop: int, chunk_rows: int) -> Iterator[int]:
    first = (start + chunk_rows - 1) // chunk_rows
    return iter(range(first, (stop + chunk_rows - 1) // chunk_rows))


def segments(plan: Plan, start: int, stop: int) -> Iterator[tuple[InputFile, int, int]]:
    """``(file, first file row, stop file row)`` of each file overlapping global rows ``[start, stop)``."""
    for f in plan.files:
        lo, hi = max(start, f.first_row), min(stop, f.first_row + f.rows)
        if lo < hi:
            yield f, lo - f.first_row, hi - f.first_row
