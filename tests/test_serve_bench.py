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
    sys.modules[spec.name] = module  # its dataclasses look their module up there
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
    pytest.importorskip("aiohttp")
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
        "--peer",
        "none",
        "--results-dir",
        str(tmp_path),
        "--no-plot",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "serve-cpu.json").read_text())
    rows = data["servers"]["llm2vec-fast"]["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4] and list(data["servers"]) == ["llm2vec-fast"]
    assert all(r["requests"] == 12 and r["tokens_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert all(r["server_cpu_s"] > 0 and r["client_cpu_s"] >= 0 for r in rows)
    assert data["summary"]["agree"] and data["config"]["texts_source"].startswith("synthetic")
    assert data["baseline"]["method"] == "encode()" and data["baseline"]["tokens"] == rows[0]["tokens"]
    assert data["baseline"]["request_encode_p50_ms"] > 0 and "c1_p50_over_request_encode" in data["summary"]
    assert set(data["summary"]["checks"]) == {"vs_direct_encode", "p99_over_p50", "min_cosine", "c1_p50"}


def test_peer_model_folder_is_a_sentence_transformers_folder_for_transformers_4(tmp_path):
    """The folder infinity-emb loads: 4.x config keys, a fast tokenizer class, mean pooling, linked weights."""
    bench = _load_module()
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"hidden_size": 8, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}))
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "pad_token": "<pad>"}))
    (source / "tokenizer.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"weights")
    folder = bench.write_peer_model(source, tmp_path / "st")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 1e5 and config["rope_scaling"] is None and config["rope_parameters"]["rope_theta"] == 1e5
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling"]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling == {"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True}
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    bench.write_peer_model(source, tmp_path / "st")  # idempotent: a second run replaces the link


def test_peer_venv_failure_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    """A venv that cannot be built gives (None, the failing step and its exit code), so the row stays empty."""
    bench = _load_module()

    class Failed:
        returncode = 3

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: Failed())
    python, reason = bench.peer_venv(tmp_path)
    assert python is None and "failed with exit code 3" in reason and "venv" in reason
