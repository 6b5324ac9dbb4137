"""``llm2vec-fast encode`` and ``demo``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from llm2vec_fast.cli import main


def test_encode_arguments_to_npy(tmp_path, default_model_dir, capsys):
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", default_model_dir, "hello world", "good night", "--normalize", "-o", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_encode_file_to_jsonl_with_instruction(tmp_path, default_model_dir, default_encoder, capsys):
    src = tmp_path / "in.txt"
    src.write_text("first line\n\nsecond line\n")
    out = tmp_path / "emb.jsonl"
    assert main(["encode", "--model", default_model_dir, "--input", str(src), "--instruction", "Represent:", "-o", str(out)]) == 0
    assert "skipped 1 blank line(s)" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and rows[1]["text"] == "second line"
    expected = default_encoder.encode([["Represent:", "second line"]], convert_to_numpy=True)[0]
    np.testing.assert_allclose(rows[1]["embedding"], expected, rtol=1e-4, atol=1e-4)


def test_encode_stdin_to_stdout(monkeypatch, default_model_dir, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert main(["encode", "--model", default_model_dir]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and len(rows[0]["embedding"]) == 576


def test_encode_doc_max_length_option(tmp_path, default_model_dir, default_encoder):
    """``--doc-max-length`` reaches the encoder: the text is trimmed to its first words."""
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", default_model_dir, "--doc-max-length", "3", "one two three four five six", "-o", str(out)]) == 0
    trimmed = default_encoder.encode(["one two three"], convert_to_numpy=True)
    whole = default_encoder.encode(["one two three four five six"], convert_to_numpy=True)
    np.testing.assert_allclose(np.load(out), trimmed, rtol=1e-4, atol=1e-4)
    assert np.abs(np.load(out) - whole).max() > 1e-2


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(
            ["encode", "--device", "cuda", "x"],
            "no CUDA GPU is usable here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is usable here"),
        ),
        (["encode", "--device", "nonsense", "x"], "unknown device 'nonsense'"),
        (["encode", "--model", "/does/not/exist", "x"], "does not exist"),
        (["encode", "x", "-o", "out.csv"], ".npy or .jsonl"),
        (["encode", "--input", "/no/such/file.txt"], "does not exist"),
    ],
)
def test_encode_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_prints_similarity_matrix(default_model_dir, capsys):
    assert main(["demo", "--model", default_model_dir]) == 0
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "1.000" in out and "nearest neighbour" in out


def test_demo_default_pairs_each_sentence_with_its_paraphrase(capsys):
    """The shipped default encoder: each example's nearest neighbour is its paraphrase (0-1, 2-3, 4-5)."""
    from llm2vec_fast.cli.demo import EXAMPLES

    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    pairs = [line.split()[:3] for line in out.split("nearest neighbour")[1].strip().splitlines()[: len(EXAMPLES)]]
    assert [(int(a.strip("[]")), int(b.strip("[]"))) for a, _, b in pairs] == [(i, i ^ 1) for i in range(len(EXAMPLES))]
    assert "note:" not in out


def test_demo_base_model_says_it_is_untrained(capsys):
    assert main(["demo", "--model", "default-base", "--device", "cpu"]) == 0
    assert "without LLM2Vec training" in capsys.readouterr().out
