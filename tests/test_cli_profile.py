"""``llm2vec-fast profile`` on CPU: the per-kernel table and a valid Chrome trace."""

from __future__ import annotations

import json

import pytest
import torch

from llm2vec_fast.cli import main


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one thread avoids OpenMP barrier waits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _check_output(out: str, trace) -> None:
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("kernel "))
    assert header.split() == ["kernel", "kind", "total", "ms", "share", "calls", "achieved", "of", "peak"]
    rows = lines[lines.index(header) + 2 :]
    attention = [r for r in rows if "scaled_dot_product" in r and " attention " in r]
    assert attention, out
    assert "TFLOP/s" in attention[0] and attention[0].rstrip().endswith("n/a"), "CPU: a rate, no peak"
    assert any(line.startswith("attention: ") and "TFLOP/s" in line for line in lines)
    assert any(line.startswith("pooling: ") and "GB/s" in line for line in lines)
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    assert any("scaled_dot_product" in str(e.get("name", "")) for e in events)


def test_profile_random_tiny_on_cpu(tmp_path, capsys, one_thread):
    trace = tmp_path / "sub" / "trace.json"
    rc = main(["profile", "--random-shapes", "tiny", "--device", "cpu", "--num-texts", "6", "--trace", str(trace), "--top", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model: random tiny; device cpu, float32; path: padded SDPA" in out
    assert "(" in out and "more)" in out, "--top 5 folds the rest into one row"
    _check_output(out, trace)


def test_profile_default_model_on_cpu(tmp_path, capsys, one_thread):
    trace = tmp_path / "trace.json"
    rc = main(["profile", "--device", "cpu", "--num-texts", "2", "--median-length", "12", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model: default model" in out
    _check_output(out, trace)


def test_profile_rejects_model_with_random_shapes(tmp_path, capsys):
    rc = main(["profile", "--random-shapes", "tiny", "--model", str(tmp_path), "--trace", str(tmp_path / "t.json")])
    assert rc == 2
    assert "--random-shapes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--median-length", "0"], "--median-length must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--max-tokens-per-batch", "-1"], "--max-tokens-per-batch must be positive"),
        (["--max-length", "4"], "--max-length must be at least 8"),
    ],
)
def test_profile_rejects_bad_sizes_before_loading(tmp_path, capsys, option, message):
    rc = main(["profile", "--random-shapes", "tiny", "--trace", str(tmp_path / "t.json"), *option])
    assert rc == 2 and message in capsys.readouterr().err
