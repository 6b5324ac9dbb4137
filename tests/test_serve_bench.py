"""``benchmarks/bench_serve.py`` end to end on a tiny model (a smoke test, not a measurement), and its
refusal to measure on a busy machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_serve.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_refuses_a_busy_machine_without_force(monkeypatch, tmp_path, capsys):
    bench = _load_module()
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert bench.main(["--results-dir", str(tmp_path), "--threads", "2"]) == 2
    assert "busy" in capsys.readouterr().err and not any(tmp_path.iterdir())
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert bench.machine_is_busy(1) == (False, 0.0)


def test_force_smoke_run_on_a_tiny_model(tiny_llama_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLM2VEC_FAST_STSB_DIR": str(tmp_path / "no-stsb")}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model",
        tiny_llama_dir,
        "--force",
        "--requests",
        "12",
        "--concurrency",
        "1",
        "4",
        "--threads",
        "1",
        "--max-batch-tokens",
        "1024",
        "--results-dir",
        str(tmp_path),
        "--no-plot",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "serve-cpu.json").read_text())
    assert [r["concurrency"] for r in data["results"]] == [1, 4]
    assert all(r["requests"] == 12 and r["tokens_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in data["results"])
    assert data["summary"]["agree"] and data["config"]["texts_source"].startswith("synthetic")
    assert data["baseline"]["method"] == "encode()" and data["baseline"]["tokens"] == data["results"][0]["tokens"]
