"""Time to the first embedding: the Triton compile + autotune stall of a fresh process, cold vs warm.

Each run is a fresh subprocess that builds a random-weight encoder (Llama-3.2-1B shapes, bf16, on
the GPU; no download), then times its FIRST ``embed_items`` call over inputs whose lengths span
several autotune length buckets (16 ... 2048 tokens): that call compiles and autotunes the
attention and pooling kernels for every bucket. A second call on the same inputs gives the
steady-state time.

* ``cold``: an empty ``TRITON_CACHE_DIR`` (what a new machine or container sees);
* ``warm``: a second process with the same cache dir: compiled kernels come from the cache and,
  where Triton's autotune has ``cache_results`` (used by the kernels when available), the tuning
  choices too, so the stall should shrink to loading.

Reported: seconds to the first embedding for both, the steady-state seconds, and the ratio
cold / warm. Run on a CUDA machine: ``python benchmarks/bench_first_embedding.py``. Writes
``benchmarks/results/first-embedding-<card>.json``. ``--cpu-smoke`` runs the same code on CPU with
a tiny model (torch path, nothing to compile: a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common

LENGTHS = (16, 40, 100, 250, 600, 1500, 2048)


def worker(shape: str, device: str) -> dict:
    from llm2vec_fast.synthetic import RANDOM_SHAPES, random_encoder, random_items

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    encoder = random_encoder(shape, device, dtype)
    lengths = [n for n in LENGTHS if n <= RANDOM_SHAPES[shape].get("max_position_embeddings", 4096)] * 2
    items = random_items(lengths, RANDOM_SHAPES[shape]["vocab_size"])
    if device == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter()
    first = encoder.embed_items(items, 8)
    if device == "cuda":
        torch.cuda.synchronize()
    got_first = time.perf_counter()
    encoder.embed_items(items, 8)
    if device == "cuda":
        torch.cuda.synchronize()
    steady = time.perf_counter() - got_first
    return {
        "model_load_s": ready - t0,
        "first_embedding_s": got_first - ready,
        "steady_s": steady,
        "finite": bool(torch.isfinite(first).all()),
        "n_inputs": len(items),
        "lengths": sorted(set(lengths)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    p.add_argument("--quick", action="store_true", help="accepted for the GPU suite (the benchmark is already short)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    shape = "tiny" if args.cpu_smoke else "llama-1b"
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, device)), flush=True)
        return 0
    if not args.cpu_smoke:
        common.require_cuda(__file__)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        env.pop("TRITON_INTERPRET", None)
        for name in ("cold", "warm"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", shape] + (["--cpu-smoke"] if args.cpu_smoke else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs[name] = json.loads(lines[-1][len("RESULT ") :])
            print(name, json.dumps(runs[name]), flush=True)
    ratio = runs["cold"]["first_embedding_s"] / max(runs["warm"]["first_embedding_s"], 1e-9)
    payload = {
        "shape": shape,
        "device": device,
        "runs": runs,
        "cold_over_warm": ratio,
        "note": "first embed_items call of a fresh process over lengths spanning the autotune buckets",
    }
    if args.cpu_smoke:
        print(json.dumps(payload, indent=1))
        return 0
    path = common.write_json("first-embedding", payload)
    print(
        f"time to first embedding: cold {runs['cold']['first_embedding_s']:.1f}s, warm {runs['warm']['first_embedding_s']:.1f}s "
        f"(x{ratio:.1f}), steady {runs['warm']['steady_s']:.2f}s -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
