"""Streaming readers of the input files: JSONL, Parquet, CSV/TSV (header row) and plain text.

Every reader yields raw ``(text, id, instruction)`` tuples, one per data row, from a given row of a
file on, without holding more than one block in memory. Values are not validated here (see
:mod:`.rows`). Line-based formats (JSONL, text) can start at a byte offset recorded by the planner,
Parquet starts at the row group that holds the row, CSV is scanned from its first row.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# never data in a folder of extensionless part files: documentation, checksums, configs, code
NOT_DATA_SUFFIXES = {".md", ".rst", ".html", ".pdf", ".yaml", ".yml", ".toml", ".py", ".sh", ".crc", ".sha256", ".lock"}
NOT_DATA_NAMES = {"README", "LICENSE", "LICENCE", "NOTICE", "CHANGELOG", "COPYING"}

FORMATS = ("jsonl", "parquet", "csv", "tsv", "text")
UTF8_BOM = b"\xef\xbb\xbf"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".text": "text",
}
PARQUET_BATCH_ROWS = 4096
CSV_BLOCK_BYTES = 1 << 20

Row = tuple  # (text, id, instruction); a field the job does not read is None
MISSING = object()  # a JSON object without the field (as opposed to an explicit null)


class MalformedInputError(ValueError):
    """An input file that cannot be read as its format (raised before any row is encoded)."""


@dataclass(frozen=True)
class Fields:
    """The columns the job reads: the text, and optionally an id and an instruction."""

    text: str = "text"
    id: str | None = None
    instruction: str | None = None

    def names(self) -> list[str]:
        return [f for f in (self.text, self.id, self.instruction) if f is not None]


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], input_format: str | None = None) -> list[Path]:
    """Files named by paths, globs (``**`` recurses) or folders (see :func:`folder_files`), each group
    sorted by name, duplicates dropped. Raises if nothing matches."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input given")
    files: list[Path] = []
    for spec in inputs:
        spec = os.fspath(spec)
        if glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"input glob {spec!r} matches no file")
        elif os.path.isdir(spec):
            matches = folder_files(Path(spec), input_format)
            if not matches:
                wanted = f"of a known format ({', '.join(sorted(EXTENSIONS))})" if input_format is None else "that is not hidden"
                raise FileNotFoundError(f"input folder {spec!r} holds no file {wanted} (names starting with . or _ are skipped)")
        elif os.path.isfile(spec):
            matches = [Path(spec)]
        else:
            raise FileNotFoundError(f"input file {spec!r} does not exist")
        files.extend(matches)
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def folder_files(folder: Path, input_format: str | None) -> list[Path]:
    """The data files of ``folder``, recursively. Names starting with ``.`` or ``_`` never count
    (``_SUCCESS``, ``.crc``, macOS ``._`` files: pyarrow datasets' rule). Without ``input_format``:
    the files of a known extension. With it: the files of that format's extensions when there are
    any, else every file but documentation (Spark's ``part-00000``, dask's ``0.part``; a README.md or
    LICENSE next to the data stays out). Other files left out are named in a warning."""
    visible = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    )
    if input_format is None:
        chosen = [p for p in visible if p.suffix.lower() in EXTENSIONS]
    else:
        own = [p for p in visible if EXTENSIONS.get(p.suffix.lower()) == input_format]
        chosen = own or [p for p in visible if p.suffix.lower() not in NOT_DATA_SUFFIXES and p.stem.upper() not in NOT_DATA_NAMES]
    left_out = [p.name for p in visible if p not in set(chosen)]
    if chosen and left_out:
        logger.warning("input folder %s: %d file(s) left out as not data: %s", folder, len(left_out), ", ".join(left_out[:5]))
    return chosen


def detect_format(path: Path, forced: str | None = None) -> str:
    if forced is not None:
        if forced not in FORMATS:
            raise ValueError(f"unknown input format {forced!r}; expected one of {FORMATS}")
        return forced
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its extension; use one of "
            f"{', '.join(sorted(EXTENSIONS))} or give the format explicitly"
        )
    return fmt


def iter_rows(path: Path, fmt: str, fields: Fields, start_row: int = 0, start_offset: int | None = None) -> Iterator[Row]:
    """Rows of ``path`` from ``start_row`` on. ``start_offset``: the byte offset of ``start_row``
    (line-based formats only; found by :func:`line_offsets`)."""
    if fmt == "parquet":
        return _parquet_rows(path, fields, start_row)
    if fmt in ("csv", "tsv"):
        return itertools.islice(_csv_rows(path, fmt, fields), start_row, None)
    if fmt == "jsonl":
        return _jsonl_rows(path, fields, start_row, start_offset)
    if fmt == "text":
        return _text_rows(path, start_row, start_offset)
    raise ValueError(f"unknown input format {fmt!r}")


def check_fields(path: Path, fmt: str, fields: Fields) -> None:
    """Fail early when a columnar file lacks a column, or a field is asked of a plain text file."""
    if fmt == "text":
        extra = [f for f in (fields.id, fields.instruction) if f is not None]
        if extra:
            raise ValueError(f"{path}: a plain text file has no fields, but id/instruction field {extra[0]!r} was asked for")
        return
    if fmt == "jsonl":
        return  # JSON objects may lack a field row by row: a bad row, not a bad file
    columns = parquet_columns(path) if fmt == "parquet" else csv_columns(path, fmt)
    missing = [f for f in fields.names() if f not in columns]
    if missing:
        raise MalformedInputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(columns)})")


# ----------------------------------------------------------------------------- line-based formats
def _open_at(path: Path, start_row: int, start_offset: int | None, skip_blank: bool):
    """A binary file positioned at data row ``start_row`` and its 0-based line number there. A UTF-8
    byte order mark at the start of the file is stepped over (editors on Windows write one)."""
    f = open(path, "rb")
    if f.read(len(UTF8_BOM)) != UTF8_BOM:
        f.seek(0)
    if start_offset:
        f.seek(start_offset)
    if start_offset is not None:
        return f, None
    row = 0
    line_no = 0
    while row < start_row:
        line = f.readline()
        if not line:
            break
        line_no += 1
        if not (skip_blank and not line.strip()):
            row += 1
    return f, line_no


def line_offsets(path: Path, fmt: str, rows: Sequence[int]) -> tuple[int, dict[int, int]]:
    """Number of data rows of a line-based file and the byte offset of each row in ``rows``."""
    wanted = set(rows)
    offsets: dict[int, int] = {}
    row = 0
    with open(path, "rb") as f:
        pos = 0
        for line in f:
            text = line[len(UTF8_BOM) :] if pos == 0 and line.startswith(UTF8_BOM) else line  # as _open_at reads it
            if not (fmt == "jsonl" and not text.strip()):
                if row in wanted:
                    offsets[row] = pos
                row += 1
            pos += len(line)
    return row, offsets


def _decode(path: Path, line: bytes, line_no: int | None) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"line {line_no + 1}" if line_no is not None else "a line"
        raise MalformedInputError(f"{path}: {where} is not valid UTF-8 ({err})") from None


def _jsonl_rows(path: Path, fields: Fields, start_row: int, start_offset: int | None) -> Iterator[Row]:
    f, line_no = _open_at(path, start_row, start_offset, skip_blank=True)
    with f:
        for line in f:
            if line_no is not None:
                line_no += 1
            if not line.strip():
                continue
            text = _decode(path, line, None if line_no is None else line_no - 1)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                where = f"line {line_no}" if line_no is not None else "a line"
                raise MalformedInputError(
                    f"{path}: {where} is not valid JSON ({err.msg}; expected JSON Lines, one object per line)"
                ) from None
            if not isinstance(obj, dict):
                where = f"line {line_no}" if line_no is not None else "a line"
                raise MalformedInputError(f"{path}: {where} is a JSON {type(obj).__name__}, not an object")
            yield (
                obj.get(fields.text, MISSING),
                obj.get(fields.id, MISSING) if fields.id is not None else None,
                obj.get(fields.instruction, MISSING) if fields.instruction is not None else None,
            )


def _text_rows(path: Path, start_row: int, start_offset: int | None) -> Iterator[Row]:
    f, line_no = _open_at(path, start_row, start_offset, skip_blank=False)
    with f:
        for line in f:
            text = _decode(path, line, line_no)
            if line_no is not None:
                line_no += 1
            yield (text.rstrip("\r\n"), None, None)


# ----------------------------------------------------------------------------------- Parquet
def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError on a bad footer
        raise MalformedInputError(f"{path}: not a readable Parquet file ({err})") from None


def parquet_columns(path: Path) -> list[str]:
    return list(_parquet_file(path).schema_arrow.names)


def parquet_num_rows(path: Path) -> int:
    return int(_parquet_file(path).metadata.num_rows)


def _parquet_rows(path: Path, fields: Fields, start_row: int) -> Iterator[Row]:
    pf = _parquet_file(path)
    meta = pf.metadata
    first_group, group_start = 0, 0
    while first_group < meta.num_row_groups and group_start + meta.row_group(first_group).num_rows <= start_row:
        group_start += meta.row_group(first_group).num_rows
        first_group += 1
    if first_group == meta.num_row_groups:
        return
    columns = list(dict.fromkeys(fields.names()))
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=range(first_group, meta.num_row_groups), columns=columns)
    rows = _columnar_rows(path, batches, fields)
    yield from itertools.islice(rows, start_row - group_start, None)


def _columnar_rows(path: Path, batches, fields: Fields) -> Iterator[Row]:
    try:
        for batch in batches:
            n = batch.num_rows
            text = batch.column(fields.text).to_pylist()
            ids = batch.column(fields.id).to_pylist() if fields.id is not None else [None] * n
            instr = batch.column(fields.instruction).to_pylist() if fields.instruction is not None else [None] * n
            yield from zip(text, ids, instr)
    except MalformedInputError:
        raise
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise MalformedInputError(f"{path}: cannot be read ({err})") from None


# --------------------------------------------------------------------------------------- CSV
def _csv_options(fmt: str, fields: Fields | None):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(
        delimiter="\t" if fmt == "tsv" else ",", quote_char=False if fmt == "tsv" else '"', newlines_in_values=fmt == "csv"
    )
    read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
    if fields is None:
        return read, parse, pacsv.ConvertOptions()
    # ids as strings too: inferred types would turn "007" into 7 and guess from the first block only
    strings = {f: pa.string() for f in (fields.text, fields.id, fields.instruction) if f is not None}
    convert = pacsv.ConvertOptions(
        include_columns=list(dict.fromkeys(fields.names())),
        column_types=strings,
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    return read, parse, convert


def _open_csv(path: Path, fmt: str, fields: Fields | None):
    import pyarrow.csv as pacsv

    read, parse, convert = _csv_options(fmt, fields)
    try:
        return pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except Exception as err:
        raise MalformedInputError(f"{path}: not a readable {fmt.upper()} file with a header row ({err})") from None


def csv_columns(path: Path, fmt: str) -> list[str]:
    return list(_open_csv(path, fmt, None).schema.names)


def _csv_rows(path: Path, fmt: str, fields: Fields) -> Iterator[Row]:
    for text, row_id, instruction in _columnar_rows(path, iter(_open_csv(path, fmt, fields)), fields):
        yield text, (_csv_id(row_id) if fields.id is not None else row_id), instruction


_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*")  # not "-0": it would merge with "0"


def _csv_id(value: str | None) -> int | str | None:
    """A CSV id as written: an integer only when it reads back the same (``"7"``, not ``"007"`` or
    ``"+7"``) and fits int64, so distinct ids never merge."""
    if value == "":  # an empty cell: a missing id (a bad row), as a null in JSONL or Parquet
        return None
    if value is not None and _CANONICAL_INT.fullmatch(value) and INT64_MIN <= int(value) <= INT64_MAX:
        return int(value)
    return value
