"""Embed a Parquet file into Parquet shards with ``encode_dataset`` (resumable; the same call scales
to many GPUs under torchrun or Ray), then read the embeddings back.

    python examples/encode_parquet.py            # 2000 rows in chunks of 500
    python examples/encode_parquet.py --quick    # 40 rows in chunks of 16 (CI)
"""

import argparse
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llm2vec_fast import encode_dataset
from llm2vec_fast.dataset import read_embeddings

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="40 rows (CI)")
args = parser.parse_args()
rows, chunk_rows = (40, 16) if args.quick else (2000, 500)

subjects = ["A man", "A woman", "Two dogs", "The committee", "A child"]
actions = ["is playing a guitar.", "runs through the snow.", "reads the report.", "slices an onion.", "sleeps on the sofa."]
texts = [f"{subjects[i % 5]} {actions[(i // 5) % 5]} ({i})" for i in range(rows)]

with tempfile.TemporaryDirectory() as work:
    corpus = Path(work) / "corpus.parquet"
    pq.write_table(pa.table({"doc_id": [f"doc-{i}" for i in range(rows)], "body": texts}), corpus)

    manifest = encode_dataset(
        corpus,
        Path(work) / "embeddings",
        text_field="body",
        id_field="doc_id",
        instruction="Represent the document for retrieval:",
        chunk_rows=chunk_rows,
        dtype_out="float16",
    )
    # rerunning the same call keeps the complete shards and redoes only missing ones
    ids, embeddings = read_embeddings(Path(work) / "embeddings")
    print(f"{len(ids)} rows -> {embeddings.shape} {embeddings.dtype} in {len(manifest['shards'])} shards; first id {ids[0]}")
    print(f"manifest: {manifest['encoded_rows']} rows encoded, {manifest['tokens']} tokens, {manifest['skipped_rows']} skipped")
