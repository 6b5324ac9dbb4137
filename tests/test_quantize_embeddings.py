"""Embedding precision and truncation: same results as sentence-transformers' ``quantize_embeddings``
and ``truncate_dim`` on the same floats, through ``encode`` (LLM2Vec and OnnxEncoder) and the CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.quantization import (
    PRECISIONS,
    calibration_ranges,
    quantize_embeddings,
    truncate_embeddings,
)

st_quantization = pytest.importorskip("sentence_transformers.quantization")

ST_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
TEXTS = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar.",
    ["Retrieve semantically similar text:", "A woman is slicing an onion."],
    "The stock market fell sharply on Monday.",
    "x",
    "Shares dropped at the start of the week after the central bank raised its rates again.",
]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")


@pytest.mark.parametrize("precision", ST_PRECISIONS)
@pytest.mark.parametrize("dim", [7, 64, 97])
def test_matches_sentence_transformers_on_the_same_floats(precision, dim):
    rng = np.random.default_rng(dim)
    emb = rng.standard_normal((200, dim)).astype(np.float32)
    calib = (rng.standard_normal((300, dim)) * 1.5).astype(np.float32)
    ranges = np.vstack([calib.min(0) - 0.1, calib.max(0) + 0.2]).astype(np.float32)
    for kwargs in ({}, {"calibration_embeddings": calib}, {"ranges": ranges}):
        if precision == "float32" and kwargs:
            continue
        ours = quantize_embeddings(emb, precision, **kwargs)
        theirs = st_quantization.quantize_embeddings(emb, precision, **kwargs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    # torch input, a constant dimension (zero-width range) and values outside the calibration range
    emb[:, 0] = 0.25
    np.testing.assert_array_equal(
        quantize_embeddings(torch.from_numpy(emb), precision, calibration_embeddings=emb[:50] * 0.5),
        st_quantization.quantize_embeddings(emb, precision, calibration_embeddings=emb[:50] * 0.5),
    )


def test_float16_and_ranges_helpers():
    emb = np.random.default_rng(0).standard_normal((150, 12)).astype(np.float32)
    out = quantize_embeddings(emb, "float16")
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, emb, rtol=1e-3, atol=1e-3)
    ranges = calibration_ranges(emb)
    assert ranges.shape == (2, 12) and ranges.dtype == np.float32
    np.testing.assert_array_equal(ranges, np.vstack([emb.min(0), emb.max(0)]))
    codes, used = quantize_embeddings(emb, "uint8", return_ranges=True)
    np.testing.assert_array_equal(used, ranges)
    assert codes.min() == 0 and codes.max() == 255  # the min and max of each dim hit the end buckets
    assert truncate_embeddings(emb, None) is emb and truncate_embeddings(emb, 5).shape == (150, 5)


def test_bad_quantization_inputs_are_rejected():
    emb = np.zeros((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="unknown precision"):
        quantize_embeddings(emb, "int4")
    with pytest.raises(TypeError, match="float"):
        quantize_embeddings(emb.astype(np.int8), "int8")
    with pytest.raises(ValueError, match="single embedding"):
        quantize_embeddings(emb[:1], "int8")
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        quantize_embeddings(emb, "int8", ranges=np.zeros((2, 7)))
    with pytest.raises(ValueError, match="calibration_embeddings must be"):
        quantize_embeddings(emb, "uint8", calibration_embeddings=np.zeros((10, 9), dtype=np.float32))
    with pytest.raises(ValueError, match="truncate_dim"):
        truncate_embeddings(emb, 0)
    with pytest.raises(ValueError, match="exceeds"):
        truncate_embeddings(emb, 9)


def test_computed_ranges_are_reported(caplog):
    emb = np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast.quantization"):
        quantize_embeddings(emb, "int8")
    assert "computed from the 20 embeddings" in caplog.text


def _st_pipeline(floats: torch.Tensor, precision: str, truncate_dim, normalize: bool, **kwargs):
    """What sentence-transformers' encode does after the forward pass: truncate, normalise, quantize."""
    from sentence_transformers.util import truncate_embeddings as st_truncate

    x = st_truncate(floats, truncate_dim)
    if normalize:
        x = torch.nn.functional.normalize(x, p=2, dim=1)
    if precision == "float32":
        return x.numpy()
    return st_quantization.quantize_embeddings(x.numpy(), precision, **kwargs)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("truncate_dim,normalize", [(None, False), (24, True), (17, False)])
def test_encode_precision_and_truncation(tiny_encoder, precision, truncate_dim, normalize):
    floats = tiny_encoder.encode(TEXTS)
    out = tiny_encoder.encode(TEXTS, precision=precision, truncate_dim=truncate_dim, normalize_embeddings=normalize)
    assert isinstance(out, torch.Tensor)
    if precision == "float16":
        expected = _st_pipeline(floats, "float32", truncate_dim, normalize).astype(np.float16)
    else:
        expected = _st_pipeline(floats, precision, truncate_dim, normalize)
    assert out.numpy().dtype == expected.dtype and out.shape == expected.shape
    if precision in ("float32", "float16"):
        np.testing.assert_allclose(out.numpy().astype(np.float32), expected.astype(np.float32), rtol=1e-5, atol=1e-6)
    else:  # identical floats in, identical codes out
        np.testing.assert_array_equal(out.numpy(), expected)
    as_numpy = tiny_encoder.encode(
        TEXTS, precision=precision, truncate_dim=truncate_dim, normalize_embeddings=normalize, convert_to_numpy=True
    )
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == expected.dtype


def test_truncation_happens_before_normalization(tiny_encoder):
    full = tiny_encoder.encode(TEXTS)
    out = tiny_encoder.encode(TEXTS, truncate_dim=16, normalize_embeddings=True)
    torch.testing.assert_close(out, torch.nn.functional.normalize(full[:, :16], dim=1))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(TEXTS)))


def test_encode_calibration_and_single_input(tiny_encoder):
    calib = tiny_encoder.encode(TEXTS * 3, truncate_dim=32, normalize_embeddings=True)
    ranges = calibration_ranges(calib)
    one = tiny_encoder.encode(
        "A man is playing a guitar.", precision="int8", truncate_dim=32, normalize_embeddings=True, quantization_ranges=ranges
    )
    assert one.shape == (32,) and one.dtype == torch.int8
    via_calib = tiny_encoder.encode(TEXTS, precision="uint8", truncate_dim=32, normalize_embeddings=True, calibration_embeddings=calib)
    via_ranges = tiny_encoder.encode(TEXTS, precision="uint8", truncate_dim=32, normalize_embeddings=True, quantization_ranges=ranges)
    torch.testing.assert_close(via_calib, via_ranges)
    binary = tiny_encoder.encode("hello", precision="ubinary")
    assert binary.shape == (8,) and binary.dtype == torch.uint8  # 64 dims -> 8 bytes
    with pytest.raises(ValueError, match="single input"):
        tiny_encoder.encode("hello", precision="int8")
    with pytest.raises(ValueError, match="unknown precision"):
        tiny_encoder.encode(TEXTS, precision="int4")
    with pytest.raises(ValueError, match="exceeds the embedding dimension 64"):
        tiny_encoder.encode(TEXTS, truncate_dim=65)
    with pytest.raises(ValueError, match="truncate_dim must be a positive integer"):
        tiny_encoder.encode(TEXTS, truncate_dim=True)


def test_onnx_encoder_has_the_same_outputs(tiny_encoder, tmp_path):
    pytest.importorskip("onnxruntime")
    from llm2vec_fast.export import OnnxEncoder, ValidationConfig, export_onnx

    folder = export_onnx(tiny_encoder, tmp_path / "onnx", precision="fp32", validate=ValidationConfig(stsb_pairs=0))
    onnx_encoder = OnnxEncoder.from_pretrained(folder)
    floats = onnx_encoder.encode(TEXTS)
    ranges = calibration_ranges(tiny_encoder.encode(TEXTS * 2, truncate_dim=48, normalize_embeddings=True))
    for precision in PRECISIONS:
        kwargs = dict(precision=precision, truncate_dim=48, normalize_embeddings=True, quantization_ranges=ranges)
        if precision not in ("int8", "uint8"):
            kwargs.pop("quantization_ranges")
        out = onnx_encoder.encode(TEXTS, **kwargs)
        expected = _st_pipeline(
            floats, "float32" if precision == "float16" else precision, 48, True, **({"ranges": ranges} if "int8" in precision else {})
        )
        if precision == "float16":
            expected = expected.astype(np.float16)
        assert out.numpy().dtype == expected.dtype and out.shape == expected.shape
        if precision in ("float32", "float16"):
            np.testing.assert_allclose(out.numpy().astype(np.float32), expected.astype(np.float32), atol=1e-3)
        else:
            np.testing.assert_array_equal(out.numpy(), expected)
        if precision in ("int8", "uint8"):  # ONNX and torch floats differ by ~1e-6: at most one bucket apart
            torch_codes = tiny_encoder.encode(TEXTS, **kwargs).numpy()
            assert np.abs(out.numpy().astype(np.int16) - torch_codes.astype(np.int16)).max() <= 1


def test_cli_precision_and_truncation(tiny_llama_dir, tmp_path, capsys):
    from llm2vec_fast.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t if isinstance(t, str) else t[1] for t in TEXTS) + "\n")
    out = tmp_path / "emb.npy"
    ranges_file = tmp_path / "ranges.npy"
    args = ["encode", "--model", tiny_llama_dir, "--input", str(texts), "--device", "cpu"]
    assert (
        main(args + ["--output", str(out), "--truncate-dim", "16", "--normalize", "--precision", "int8", "--save-ranges", str(ranges_file)])
        == 0
    )
    err = capsys.readouterr().err
    assert "int8 ranges from the 6 encoded texts" in err
    codes = np.load(out)
    assert codes.dtype == np.int8 and codes.shape == (6, 16)
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")
    floats = encoder.encode([t if isinstance(t, str) else t[1] for t in TEXTS], truncate_dim=16, normalize_embeddings=True).numpy()
    np.testing.assert_array_equal(codes, st_quantization.quantize_embeddings(floats, "int8"))
    np.testing.assert_array_equal(np.load(ranges_file), calibration_ranges(floats))
    # saved ranges reused for a single text
    assert (
        main(
            args[:3]
            + [
                "A man is playing a guitar.",
                "--device",
                "cpu",
                "--truncate-dim",
                "16",
                "--normalize",
                "--precision",
                "int8",
                "--ranges",
                str(ranges_file),
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip())
    single = encoder.encode(["A man is playing a guitar."], truncate_dim=16, normalize_embeddings=True).numpy()
    saved = np.load(ranges_file)
    np.testing.assert_array_equal(line["embedding"], st_quantization.quantize_embeddings(single, "int8", ranges=saved)[0])
    # alone or in a batch of six, the floats may differ in their last bits (padding changes the
    # summation order on some CPUs), so a value on a bucket edge may move by one code, never more
    assert np.abs(np.asarray(line["embedding"], dtype=np.int32) - codes[0].astype(np.int32)).max() <= 1
    assert main(args + ["--output", str(out), "--precision", "ubinary"]) == 0
    assert np.load(out).shape == (6, 8) and np.load(out).dtype == np.uint8
    assert "wrote 6 embeddings of 8 bytes of packed bits" in capsys.readouterr().err  # not "dimension 8"
    one_line = tmp_path / "one.txt"
    one_line.write_text("just one calibration text\n")
    assert main(args + ["--precision", "int8", "--calibration", str(one_line)]) == 2
    assert "holds fewer than two non-empty lines" in capsys.readouterr().err
    not_npy = tmp_path / "ranges.txt"
    not_npy.write_text("0 1\n")
    assert main(args + ["--precision", "int8", "--ranges", str(not_npy)]) == 2
    assert "is not a .npy array of shape (2, D)" in capsys.readouterr().err
    assert main(args + ["--precision", "float32", "--ranges", str(ranges_file)]) == 2
    assert "--ranges applies to --precision int8 or uint8 only" in capsys.readouterr().err
    assert main(args + ["--truncate-dim", "100"]) == 2
    assert "exceeds the embedding dimension 64" in capsys.readouterr().err
