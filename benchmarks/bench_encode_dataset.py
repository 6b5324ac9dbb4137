"""Throughput of ``encode_dataset`` (streaming read, chunking, Parquet shards, manifest, resume
bookkeeping) against ``LLM2Vec.encode`` on the same texts, with the real default model.

Methods, same texts (STS-B train sentences from ``../shared/data/stsbenchmark``, one JSONL file):
  * ``encode()``          -- ``LLM2Vec.encode(texts)`` in this process (baseline; tokenisation included).
  * ``dataset 1 proc``    -- ``encode_dataset(..., encoder=<the same model>)`` in this process: plan,
    read, tokenise, embed, weights fingerprint, write shards and manifest. Timed from the call to its
    return.
  * ``dataset N ranks``   -- ``torchrun --nproc-per-node N -m llm2vec_fast.cli encode-dataset``
    (gloo on CPU, one GPU per rank on CUDA). Timed by rank 0 from the start of the job to the complete
    manifest, minus rank 0's model load (process start-up and imports are not counted).

Fair comparison: the model is loaded once and excluded from both sides; both paths are warmed up
once (encode() on a few batches, encode_dataset on a tiny file, so its first import of pyarrow is
not counted); everything else a job does is counted. The default size (2000 texts on CPU, about
17k tokens, cut into 8 chunks of 250 rows) makes per-job fixed costs small but keeps 40x more
shards per row than the library's default 10000-row chunks, so per-shard costs are overstated, not
hidden. Since chunks are embedded together up to ``SORT_WINDOW_ROWS`` rows under one length sort,
the chunk size no longer changes the padding.

On CPU the threads are shared out: ``--threads`` for one process, ``threads / N`` per rank. Reports rows/s,
tokens/s, the overhead ratio ``dataset 1 proc seconds / encode() seconds`` (goal <= 1.05) and the
speed-up of N ranks over one process; checks that the dataset embeddings equal ``encode()``'s
(min cosine >= 0.99999 on CPU fp32). Load-independent split of the overhead: each method's
``forward_tokens`` (tokens through the model, padding included; the manifest's count for the dataset
runs, ``LLM2Vec.forward_lengths`` for encode()), so ``forward_tokens_ratio`` is the "more padding"
part and ``overhead_ratio / forward_tokens_ratio`` the "I/O and bookkeeping" part; the 1-process
run's manifest phases (plan, weights fingerprint, encoding, the rest) are recorded too.

    python benchmarks/bench_encode_dataset.py            # writes benchmarks/results/encode_dataset-<card>.json/.png
    python benchmarks/bench_encode_dataset.py --quick    # a smoke run (few texts, one repeat)

It refuses to measure on a busy machine (1-minute load average above ``cpus - threads + 0.5``);
``--force`` measures anyway but writes only to ``--results-dir`` or a temporary folder, never to
``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from . import common
except ImportError:  # run as a script
    import common

NAME = "encode_dataset"
OVERHEAD_GOAL = 1.05
MIN_COSINE = 0.99999


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 texts, one repeat: checks the script, not a measurement")
    p.add_argument("--num-texts", type=int, default=None, help="texts (default 2000 on CPU, 50000 on GPU; 200 with --quick)")
    p.add_argument("--ranks", type=int, default=None, help="ranks of the torchrun run (default 2 on CPU, one per GPU on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: every CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method, median kept (default 3, 1 with --quick)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: num_texts / 8, at least 64)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="measure on a busy machine; results go to --results-dir or a temp folder")
    p.add_argument("--results-dir", default=None, help="where the JSON and PNG go (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def busy(threads: int) -> tuple[bool, float]:
    load = os.getloadavg()[0]
    return load > (os.cpu_count() or 1) - threads + 0.5, load


def texts_for(n: int) -> list[str]:
    from llm2vec_fast.stsb import stsb_sentences

    sentences = stsb_sentences("train")
    return [sentences[i % len(sentences)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(data: Path, out: Path, args, model: str, ranks: int, threads_per_rank: int, cuda: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "llm2vec_fast.cli",
        "encode-dataset",
        "--input",
        str(data),
        "--output",
        str(out),
        "--model",
        model,
        "--chunk-rows",
        str(args.chunk_rows),
        "--batch-size",
        str(args.batch_size),
        "--overwrite",
        "--no-progress",
    ] + ([] if cuda else ["--device", "cpu"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": manifest["timings"]["total"] - manifest["timings"]["load_model"], "manifest": manifest}


def main(argv=None) -> int:
    args = parse_args(argv)
    from llm2vec_fast import LLM2Vec, encode_dataset
    from llm2vec_fast.dataset import read_embeddings
    from llm2vec_fast.dataset.chunk_worker import SORT_WINDOW_ROWS
    from llm2vec_fast.default_model import default_model_path

    cuda = torch.cuda.is_available()
    threads = args.threads or os.cpu_count() or 1
    is_busy, load = busy(0 if cuda else threads)
    if is_busy and not args.force:
        print(
            f"machine busy (1-min load average {load:.2f} with {os.cpu_count()} CPUs, {threads} threads wanted): not measuring. "
            "Rerun on a quiet machine, or with --force (results then go to --results-dir or a temp folder)."
        )
        return 1
    results_dir = (
        Path(args.results_dir) if args.results_dir else (Path(tempfile.mkdtemp(prefix="bench-encode-dataset-")) if args.force else None)
    )
    if args.force and results_dir is not None and results_dir.resolve() == common.RESULTS_DIR.resolve():
        sys.exit("--force results may not go to benchmarks/results")
    n = args.num_texts or (200 if args.quick else (50_000 if cuda else 2000))
    args.chunk_rows = args.chunk_rows or max(64, n // 8)
    ranks = args.ranks or (torch.cuda.device_count() if cuda else 2)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(threads)
    model = str(args.model or default_model_path())
    encoder = LLM2Vec.from_pretrained(model)
    texts = texts_for(n)
    tokens = sum(len(x.input_ids) for x in encoder.tokenize(texts))
    work = Path(tempfile.mkdtemp(prefix="bench-encode-dataset-work-"))
    data = work / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    forward_encode = int(encoder.forward_lengths(encoder.tokenize(texts), args.batch_size).sum())
    encoder.encode(texts[: 4 * args.batch_size], batch_size=args.batch_size)  # warm-up
    warm = work / "warm.jsonl"
    warm.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:8]), encoding="utf-8")
    encode_dataset(warm, work / "warm", encoder=encoder, chunk_rows=4, batch_size=args.batch_size, show_progress_bar=False)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    seconds = {"encode()": [], "dataset 1 proc": [], f"dataset {ranks} ranks": []}
    forward = {"encode()": forward_encode}
    phases = []
    reference = None
    for _ in range(repeats):  # interleaved, so a load spike hits every method alike
        s, reference = timed(lambda: encoder.encode(texts, batch_size=args.batch_size, convert_to_numpy=True))
        seconds["encode()"].append(s)
        s, manifest = timed(
            lambda: encode_dataset(
                data,
                work / "one",
                encoder=encoder,
                chunk_rows=args.chunk_rows,
                batch_size=args.batch_size,
                overwrite=True,
                show_progress_bar=False,
            )
        )
        seconds["dataset 1 proc"].append(s)
        forward["dataset 1 proc"] = manifest["forward_tokens"]
        t = manifest["timings"]
        phases.append(
            {
                "seconds": s,
                "plan": t["plan"],
                "weights_fingerprint": t.get("model_settings", 0.0),
                "encode": manifest["encode_seconds"],
                "rest": s - t["plan"] - t.get("model_settings", 0.0) - manifest["encode_seconds"],
            }
        )
        multi = run_torchrun(data, work / "multi", args, model, ranks, max(1, threads // ranks), cuda)
        seconds[f"dataset {ranks} ranks"].append(multi["seconds"])
        forward[f"dataset {ranks} ranks"] = multi["manifest"]["forward_tokens"]

    cosines = {}
    for label, out in (("dataset 1 proc", work / "one"), (f"dataset {ranks} ranks", work / "multi")):
        ids, emb = read_embeddings(out)
        assert ids == list(range(n)), f"{label}: rows missing or duplicated"
        cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
        cosines[label] = float(cos.min())
    rows = []
    for label, values in seconds.items():
        med = statistics.median(values)
        rows.append(
            {
                "method": label,
                "seconds": med,
                "rows_per_s": n / med,
                "tokens_per_s": tokens / med,
                "forward_tokens": forward[label],
                "padding_ratio": forward[label] / tokens,
                "min_cosine_vs_encode": cosines.get(label, 1.0),
                "runs": values,
            }
        )
    base, one, multi_row = rows
    overhead = one["seconds"] / base["seconds"]
    forward_ratio = one["forward_tokens"] / base["forward_tokens"]
    summary = {
        "overhead_ratio": overhead,
        "overhead_goal": OVERHEAD_GOAL,
        "overhead_ok": overhead <= OVERHEAD_GOAL,
        # load-independent: tokens (padding included) through the model, dataset 1 proc / encode()
        "forward_tokens_ratio": forward_ratio,
        # the rest of the overhead, if time follows forward tokens: reading, writing, bookkeeping
        "io_and_bookkeeping_ratio": overhead / forward_ratio,
        "phases_1_proc_median_run": sorted(phases, key=lambda r: r["seconds"])[len(phases) // 2],
        f"speedup_{ranks}_ranks_vs_1_proc": one["seconds"] / multi_row["seconds"],
        "agree": all(c >= (MIN_COSINE if not cuda else 0.999) for c in cosines.values()),
        "baseline_sane": base["rows_per_s"] > 0 and all(v > 0 for v in seconds["encode()"]),
    }
    common.print_table(
        rows, ["method", "seconds", "rows_per_s", "tokens_per_s", "forward_tokens", "min_cosine_vs_encode"], floatfmt="{:.3f}"
    )
    print(json.dumps(summary, indent=2))
    payload = {
        "description": __doc__.split("\n\n")[0],
        "settings": {
            "num_texts": n,
            "tokens": tokens,
            "chunk_rows": args.chunk_rows,
            "sort_window_rows": SORT_WINDOW_ROWS,
            "batch_size": args.batch_size,
            "threads": threads,
            "ranks": ranks,
            "repeats": repeats,
            "model": common.portable_path(model),
            "quick": args.quick,
            "load_average_before": load,
            "load_average_after": os.getloadavg()[0],
            "forced": args.force,
        },
        "results": rows,
        "summary": summary,
    }
    path = common.write_json(NAME, payload, results_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        png = common.plot_grouped_bars(
            NAME,
            "encode_dataset vs encode()",
            "per second",
            [f"{n} texts"],
            {"rows/s": {r["method"]: [r["rows_per_s"]] for r in rows}, "tokens/s": {r["method"]: [r["tokens_per_s"]] for r in rows}},
            results_dir,
        )
        if png:
            print(f"wrote {png}")
    return 0 if summary["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
