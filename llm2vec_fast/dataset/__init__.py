"""Encode whole datasets: streaming, sharded, resumable, in one process, under torchrun, or on Ray Data.

Public interface: :func:`encode_dataset` (also ``llm2vec_fast.encode_dataset`` and the
``llm2vec-fast encode-dataset`` command).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .chunk_worker import JobOptions
from .coordination import RankFailedError
from .job import EncoderSpec
from .manifest import MANIFEST, SettingsMismatchError
from .plan import ON_BAD_ROW, BadRowError
from .readers import FORMATS, Fields, MalformedInputError, expand_inputs
from .writer import DTYPES_OUT

ENGINES = ("local", "ray")
DEFAULT_CHUNK_ROWS = 10_000

__all__ = [
    "encode_dataset",
    "read_embeddings",
    "BadRowError",
    "MalformedInputError",
    "SettingsMismatchError",
    "RankFailedError",
    "ENGINES",
    "FORMATS",
    "MANIFEST",
]


def encode_dataset(
    input: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    encoder=None,
    model_kwargs: dict | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    instruction: str | None = None,
    instruction_field: str | None = None,
    input_format: str | None = None,
    engine: str = "local",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    dtype_out: str = "float32",
    on_bad_row: str = "error",
    batch_size: int = 32,
    overwrite: bool = False,
    show_progress_bar: bool | None = None,
    num_workers: int | None = None,
) -> dict:
    """Embed every row of a dataset into Parquet shards plus a ``manifest.json``; return the manifest.

    Input: JSONL (one object per line), Parquet, CSV/TSV with a header row (TSV unquoted), or plain
    text (one text per line), given as files, globs or folders; the format comes from the extension
    (``input_format`` forces one of :data:`FORMATS`). Files are read as streams: memory does not grow
    with the input. Rows are numbered across files in the order given (each glob/folder sorted).

    Output (``output`` folder): ``part-NNNNNN.parquet`` shards with columns ``id`` (``id_field``'s
    value, int64 if every id is an integer, else string; without ``id_field`` the global row number)
    and ``embedding`` (fixed-size list of float32, or float16 with ``dtype_out="float16"``). Rows are
    cut by position into chunks of ``chunk_rows``; chunk *k* is shard *k*, written under a temporary
    name and renamed when complete. ``manifest.json`` holds the settings, model and dimension, rows
    per shard, skipped rows, total time and tokens.

    Guarantees: every row is in exactly one shard or in the manifest's ``skipped`` list, whatever the
    engine or number of ranks/workers. Rerunning after a crash keeps complete shards and redoes the
    rest; a rerun with another model (weights fingerprint), encoder settings, fields, chunking or
    inputs is refused with :class:`SettingsMismatchError` naming the differences, unless
    ``overwrite=True``, which starts from scratch. Embeddings equal ``LLM2Vec.encode`` of the same
    texts (``[instruction, text]`` pairs when an instruction is given).

    Args:
        input: a path, glob or folder, or a list of them.
        output: the output folder (created; shared by every rank/node).
        model: checkpoint folder for ``LLM2Vec.from_pretrained`` (``None``: the embedded default).
        encoder: an already loaded ``LLM2Vec`` instead of ``model`` (local engine; under torchrun each
            rank passes its own).
        model_kwargs: more ``LLM2Vec.from_pretrained`` arguments (``peft_model_name_or_path``,
            ``pooling_mode``, ``max_length``, ``dtype``, ``device``, ...). Without ``device`` each
            torchrun rank uses ``cuda:LOCAL_RANK`` (or the CPU).
        text_field / id_field / instruction_field: column or JSON key names (not for plain text).
        instruction: one instruction for every row (attended to, not pooled); exclusive with
            ``instruction_field`` (a null or missing per-row instruction means none).
        engine: ``"local"`` (one process, or every rank under ``torchrun``) or ``"ray"`` (Ray Data;
            ``pip install "llm2vec-fast[ray]"``; joins a running Ray, else starts a local one).
        chunk_rows: rows per chunk (unit of work, resume and output shard).
        dtype_out: ``"float32"`` or ``"float16"``.
        on_bad_row: a missing, null, empty or non-string text (or missing id): ``"error"`` (default,
            raises :class:`BadRowError` naming the file and row before any encoding) or ``"skip"``
            (listed in the manifest). A file that cannot be parsed raises
            :class:`MalformedInputError` naming it, before any encoding, under either policy.
        batch_size: inputs per forward pass (as in ``encode``).
        overwrite: delete a previous job's shards and manifest in ``output`` first.
        show_progress_bar: rows/s and tokens/s on rank 0 (``None``: on).
        num_workers: Ray actors (default: one per GPU, else one per CPU of the Ray cluster).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if dtype_out not in DTYPES_OUT:
        raise ValueError(f"dtype_out must be one of {DTYPES_OUT}, got {dtype_out!r}")
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if instruction and instruction_field:
        raise ValueError("give instruction or instruction_field, not both")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError("text_field must be a non-empty string")
    if encoder is not None and (model is not None or model_kwargs):
        raise ValueError("give encoder, or model/model_kwargs, not both")
    if encoder is not None and engine == "ray":
        raise ValueError('engine="ray" loads the model in every actor: pass model/model_kwargs, not encoder')
    paths = expand_inputs(input, input_format)
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {str(out_dir)!r} exists and is not a folder")
    options = JobOptions(Fields(text_field, id_field, instruction_field), instruction or None, dtype_out, batch_size)
    spec = EncoderSpec(None if model is None else os.fspath(model), dict(model_kwargs or {}))
    common = dict(
        chunk_rows=chunk_rows,
        on_bad_row=on_bad_row,
        input_format=input_format,
        overwrite=overwrite,
        show_progress_bar=True if show_progress_bar is None else bool(show_progress_bar),
    )
    if engine == "ray":
        from .ray_engine import run_ray

        return run_ray(paths, out_dir, options, spec=spec, num_workers=num_workers, **common)
    from .local import run_local

    load = (lambda local_rank: encoder) if encoder is not None else spec.load
    return run_local(paths, out_dir, options, load_encoder=load, **common)


def read_embeddings(output: str | os.PathLike):
    """``(ids, embeddings)`` of a finished job, in row order (reads every shard: for checks and small
    jobs; large jobs read the shards with pyarrow or any Parquet reader)."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    out_dir = Path(output)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise ValueError(f"{out_dir} holds an unfinished job; rerun it to resume")
    ids, parts, dim = [], [], manifest["dimension"]
    for shard in manifest["shards"]:
        table = pq.read_table(out_dir / shard["file"])
        ids.extend(table.column("id").to_pylist())
        emb = table.column("embedding").combine_chunks()
        parts.append(emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), dim))  # a shard may hold no row
    return ids, (np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32))
