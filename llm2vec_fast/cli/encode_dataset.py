"""``llm2vec-fast encode-dataset``: embed a whole dataset into Parquet shards (see ``llm2vec_fast.encode_dataset``).

One process: ``llm2vec-fast encode-dataset ...``; several GPUs or nodes:
``torchrun --nproc-per-node N -m llm2vec_fast.cli encode-dataset ...``; a Ray cluster: ``--engine ray``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..dataset import DEFAULT_CHUNK_ROWS, ENGINES, FORMATS, encode_dataset
from ..dataset.coordination import distributed_env
from ..dataset.plan import ON_BAD_ROW
from ..dataset.writer import DTYPES_OUT
from .common import add_model_options, encoder_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser(
        "encode-dataset",
        help="embed a dataset (JSONL, Parquet, CSV/TSV, text) into Parquet shards",
        description=__doc__.split("\n\n")[0] + " Resumable: rerun the same command after a crash.",
    )
    p.add_argument(
        "--input",
        "-i",
        required=True,
        nargs="+",
        metavar="PATH_OR_GLOB",
        help="input files, globs (quote them) or folders: .jsonl, .parquet, .csv, .tsv (header row), .txt",
    )
    p.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="output folder (shards + manifest.json)")
    p.add_argument("--input-format", choices=FORMATS, default=None, help="format of every input (default: from the extension)")
    p.add_argument("--text-field", default="text", help="column / JSON key of the text (default: text)")
    p.add_argument("--id-field", default=None, help="column / JSON key of the id (default: the global row number)")
    instr = p.add_mutually_exclusive_group()
    instr.add_argument("--instruction", default=None, help="instruction for every row (attended to, not pooled)")
    instr.add_argument("--instruction-field", default=None, help="column / JSON key of a per-row instruction")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local (one process, or each torchrun rank) or ray")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help=f"rows per chunk and shard (default {DEFAULT_CHUNK_ROWS})")
    p.add_argument("--dtype-out", choices=DTYPES_OUT, default="float32", help="embedding type in the shards")
    p.add_argument(
        "--on-bad-row",
        choices=ON_BAD_ROW,
        default="error",
        help="missing/null/empty/non-string text: error (default, names file and row) or skip (listed in the manifest)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="delete a previous job in --output and start from scratch")
    p.add_argument("--num-workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        try:
            import ray.data  # noqa: F401
        except ImportError:
            raise RuntimeError('--engine ray needs Ray Data: pip install "llm2vec-fast[ray]"') from None
    manifest = encode_dataset(
        args.input,
        args.output,
        args.model,
        model_kwargs=encoder_kwargs(args),
        text_field=args.text_field,
        id_field=args.id_field,
        instruction=args.instruction,
        instruction_field=args.instruction_field,
        input_format=args.input_format,
        engine=args.engine,
        chunk_rows=args.chunk_rows,
        dtype_out=args.dtype_out,
        on_bad_row=args.on_bad_row,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        show_progress_bar=not args.no_progress,
        num_workers=args.num_workers,
    )
    if distributed_env()[0] == 0:
        print(
            f"encoded {manifest['encoded_rows']} rows ({manifest['skipped_rows']} skipped, {manifest['tokens']} tokens) "
            f"into {len(manifest['shards'])} shards of dimension {manifest['dimension']} in {args.output}",
            file=sys.stderr,
        )
    return 0
