"""Throughput and latency of ``llm2vec-fast serve`` under concurrent load, against direct ``encode()``.

A real server (``llm2vec-fast serve``, a subprocess on 127.0.0.1, default model on CPU unless
``--model``) is driven by a bounded async httpx load generator: the same list of requests (STS-B dev
sentences, ``--texts-per-request`` each; synthetic sentences when STS-B is absent) is sent at each
concurrency (default 1, 8, 32), each client sending its next request when the previous one returns.
Per level: requests/s, texts/s, tokens/s (from the server's ``usage.prompt_tokens``, i.e. the real
tokenisation), p50/p95/p99 latency, and the batches the server formed (from ``/metrics``).
Baseline: ``LLM2Vec.encode`` of all the texts in one call (batch 32) in this process, while the server
idles. Every response is checked against that baseline (min cosine >= 0.9999).

Target (issue 12): dynamic batching gives >= 2x the requests/s of concurrency 1 at concurrency 32.

Timing needs a quiet machine: the script refuses to run when the 1-minute load average leaves fewer
than ``--threads`` idle cores. ``--force`` runs anyway as a smoke test and writes only to
``--results-dir`` or a temporary folder, never to ``benchmarks/results``.

    OMP_NUM_THREADS=2 python benchmarks/bench_serve.py            # writes benchmarks/results/serve-cpu.{json,png}
    python benchmarks/bench_serve.py --quick --force               # smoke test on a busy machine
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from . import common
except ImportError:  # run as a script
    import common

TARGET_SPEEDUP = 2.0  # requests/s at the highest concurrency over concurrency 1
MIN_COSINE = 0.9999
REQUEST_TIMEOUT_S = 120
STARTUP_TIMEOUT_S = 300
WORDS = (
    "model server token batch vector search query answer passage language fast encoder attention layer "
    "river mountain city music science history market weather game story"
).split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level (default 384; 64 with --quick)")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2),
        help="torch threads of the server and the baseline (default $OMP_NUM_THREADS or 2)",
    )
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke test)")
    p.add_argument("--force", action="store_true", help="run on a busy machine (smoke only: never writes benchmarks/results)")
    p.add_argument("--results-dir", default=None, help="where JSON and PNG go (default benchmarks/results; a temp folder with --force)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default="serve", help="results file stem (default: serve)")
    return p.parse_args(argv)


def machine_is_busy(threads: int) -> tuple[bool, float]:
    """Whether the 1-minute load average leaves fewer than ``threads`` idle cores."""
    load = os.getloadavg()[0]
    return load > (os.cpu_count() or 1) - threads + 0.5, load


def load_texts(n: int, seed: int = 0) -> tuple[list[str], str]:
    try:
        from llm2vec_fast.stsb import stsb_sentences

        sentences = [s for s in dict.fromkeys(stsb_sentences("dev")) if s.strip()]
        if len(sentences) >= n:
            return sentences[:n], "STS-B dev sentences"
    except (FileNotFoundError, OSError):
        pass
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 30)))) for _ in range(n)], "synthetic sentences (no STS-B)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from llm2vec_fast.cli import main; sys.exit(main())",
        "serve",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-batch-tokens",
        str(args.max_batch_tokens),
    ] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"the server was not healthy after {STARTUP_TIMEOUT_S} s")


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-zA-Z0-9_:]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


async def run_level(url: str, requests: list[list[str]], concurrency: int) -> dict:
    """Send every request once with ``concurrency`` clients; latencies, tokens and embeddings."""
    import httpx

    results: list = [None] * len(requests)
    latencies = [0.0] * len(requests)
    next_index = iter(range(len(requests)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:  # shared iterator: each request is sent once
            started = time.perf_counter()
            r = await http.post(f"{url}/v1/embeddings", json={"input": requests[i], "encoding_format": "base64"})
            latencies[i] = time.perf_counter() - started
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {r.status_code}: {r.text[:300]}")
            body = r.json()
            vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
            results[i] = (vectors, body["usage"]["prompt_tokens"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(concurrency))), REQUEST_TIMEOUT_S * 5)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "latencies": latencies, "results": results}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    args = parse_args(argv)
    busy, load = machine_is_busy(args.threads)
    if busy and not args.force:
        print(
            f"bench_serve.py: the machine is busy (1-min load average {load:.2f} on {os.cpu_count()} cores, "
            f"{args.threads} threads needed); not measuring. Re-run on a quiet machine, or pass --force for a smoke test "
            "that writes no official results.",
            file=sys.stderr,
        )
        return 2
    if args.force:
        results_dir = Path(args.results_dir or tempfile.mkdtemp(prefix="bench-serve-"))
        if results_dir.resolve() == common.RESULTS_DIR.resolve():
            raise SystemExit("--force results never go to benchmarks/results; pick another --results-dir")
    else:
        results_dir = Path(args.results_dir) if args.results_dir else common.RESULTS_DIR
    n_requests = args.requests or (64 if args.quick else 384)
    texts, source = load_texts(n_requests * args.texts_per_request)
    requests = [texts[i * args.texts_per_request : (i + 1) * args.texts_per_request] for i in range(n_requests)]

    import torch

    from llm2vec_fast import LLM2Vec

    torch.set_num_threads(args.threads)
    encoder = LLM2Vec.from_pretrained(args.model, device="cpu")
    tokens = sum(len(x.input_ids) for x in encoder.tokenize(texts))
    encoder.encode(texts[:64], batch_size=32)  # warm-up
    encode_s = float("inf")
    for _ in range(2):  # best of two passes: the baseline must not be handicapped by a noisy moment
        started = time.perf_counter()
        reference = encoder.encode(texts, batch_size=32, convert_to_numpy=True)
        encode_s = min(encode_s, time.perf_counter() - started)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    baseline = {
        "method": "encode()",
        "texts": len(texts),
        "tokens": tokens,
        "seconds": encode_s,
        "texts_per_s": len(texts) / encode_s,
        "tokens_per_s": tokens / encode_s,
        "batch_size": 32,
    }
    print(f"direct encode(): {len(texts)} texts, {tokens} tokens in {encode_s:.2f} s = {baseline['texts_per_s']:.1f} texts/s", flush=True)
    del encoder

    log_path = results_dir / f"{args.name}-server.log" if not args.force else Path(tempfile.mkstemp(suffix=".log")[1])
    results_dir.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args, log_path)
    rows = []
    min_cos = 1.0
    try:
        asyncio.run(run_level(url, requests[: min(16, n_requests)], 4))  # warm-up
        for c in args.concurrency:
            before = scrape(url)
            level = asyncio.run(run_level(url, requests, c))
            after = scrape(url)
            got = np.concatenate([v for v, _ in level["results"]])
            min_cos = min(min_cos, float((got * reference).sum(1).min()))
            served_tokens = sum(t for _, t in level["results"])
            batches = after["llm2vec_batch_requests_count"] - before["llm2vec_batch_requests_count"]
            lat = level["latencies"]
            rows.append(
                {
                    "concurrency": c,
                    "requests": n_requests,
                    "texts": len(texts),
                    "tokens": served_tokens,
                    "seconds": level["seconds"],
                    "requests_per_s": n_requests / level["seconds"],
                    "texts_per_s": len(texts) / level["seconds"],
                    "tokens_per_s": served_tokens / level["seconds"],
                    "p50_ms": 1e3 * percentile(lat, 50),
                    "p95_ms": 1e3 * percentile(lat, 95),
                    "p99_ms": 1e3 * percentile(lat, 99),
                    "mean_ms": 1e3 * statistics.mean(lat),
                    "batches": batches,
                    "mean_requests_per_batch": n_requests / batches if batches else float("nan"),
                    "vs_direct_encode": (len(texts) / level["seconds"]) / baseline["texts_per_s"],
                }
            )
            r = rows[-1]
            print(
                f"concurrency {c:>3}: {r['requests_per_s']:.1f} req/s, {r['tokens_per_s']:.0f} tokens/s, p50 {r['p50_ms']:.0f} ms, "
                f"p95 {r['p95_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, {r['mean_requests_per_batch']:.1f} requests/batch",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    if served_tokens != tokens:
        raise SystemExit(f"the server counted {served_tokens} prompt tokens, encode() tokenised {tokens}")
    lowest, highest = rows[0], rows[-1]
    speedup = highest["requests_per_s"] / lowest["requests_per_s"]
    summary = {
        "speedup": speedup,
        "speedup_of": f"requests/s at concurrency {highest['concurrency']} over {lowest['concurrency']}",
        "target": TARGET_SPEEDUP,
        "meets_target": speedup >= TARGET_SPEEDUP,
        "min_cosine_vs_encode": min_cos,
        "agree": min_cos >= MIN_COSINE,
        "load_avg_before": load,
        "load_avg_after": os.getloadavg()[0],
        # HTTP on top of the model cannot beat one big encode() call by much: if it does, distrust the run
        "baseline_sane": max(r["texts_per_s"] for r in rows) <= 1.2 * baseline["texts_per_s"],
    }
    if not summary["baseline_sane"]:
        print("WARNING: the server beat direct encode() by > 1.2x: the baseline or the machine was disturbed; re-run on a quiet machine")
    print(
        f"speed-up {speedup:.2f}x (target >= {TARGET_SPEEDUP:.1f}x: {'met' if summary['meets_target'] else 'MISSED'}); "
        f"min cosine vs encode() {min_cos:.6f}"
    )
    config = {k: v for k, v in vars(args).items() if k != "no_plot"}
    config.update(requests=n_requests, texts_source=source, device="cpu", forced_on_busy_machine=bool(args.force and busy))
    payload = {
        "config": config,
        "timed": "HTTP round trips of a bounded async httpx load generator against a real server; "
        "baseline: one LLM2Vec.encode() call over the same texts",
        "baseline": baseline,
        "results": rows,
        "summary": summary,
    }
    path = common.write_json(args.name, payload, results_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        png = plot(rows, baseline, results_dir / f"{args.name}-{common.card_name()}.png")
        if png:
            print(f"wrote {png}")
    return 0 if summary["agree"] else 1


def plot(rows: list[dict], baseline: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    conc = [str(r["concurrency"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.bar(conc, [r["texts_per_s"] for r in rows], color="tab:blue", label="server")
    ax1.axhline(baseline["texts_per_s"], color="tab:red", linestyle="--", label="direct encode()")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("texts/s (higher is better)")
    ax1.legend()
    width = 0.25
    for k, q in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        ax2.bar([i + (k - 1) * width for i in range(len(rows))], [r[q] for r in rows], width, label=q.replace("_ms", ""))
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels(conc)
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("latency ms (lower is better)")
    ax2.legend()
    fig.suptitle(f"llm2vec-fast serve, dynamic batching ({common.card_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
