"""``precision`` on the server (in process, ``TestClient``, tiny random model): the codes of
``/v1/embeddings`` and ``/embed`` are sentence-transformers' ``quantize_embeddings`` of the server's
own float32 vectors (int8/uint8 buckets from the server's calibration set put through the same
``dimensions`` / normalisation), match ``encode(precision=...)``, and base64 carries the documented
dtype. Requests the server cannot answer get clear 4xx errors."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.quantization import PRECISION_DTYPES, PRECISIONS, CalibrationSet  # noqa: E402
from llm2vec_fast.serve import ServeSettings, create_app  # noqa: E402

TEXTS = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar.",
    ["Retrieve semantically similar text:", "A woman is slicing an onion."],
    "The stock market fell sharply on Monday.",
    "x",
]
CALIBRATION = [
    f"calibration sentence number {i} about {topic}"
    for i, topic in enumerate(["cats", "the weather", "stock prices", "football", "cooking pasta", "old castles"] * 4)
]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", max_length=128)


@pytest.fixture(scope="module")
def calibration_floats(tiny_encoder) -> np.ndarray:
    return tiny_encoder.encode(CALIBRATION, convert_to_numpy=True)


@pytest.fixture(scope="module")
def client(tiny_encoder, calibration_floats):
    app = create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256), CalibrationSet(calibration_floats))
    with TestClient(app) as c:
        yield c


def _post(client, path: str, precision: str, dimensions, normalize: bool = True, **extra):
    if path == "/v1/embeddings":
        r = client.post(path, json={"input": TEXTS, "precision": precision, "dimensions": dimensions, **extra})
        assert r.status_code == 200, r.text
        return [d["embedding"] for d in r.json()["data"]]
    r = client.post(path, json={"inputs": TEXTS, "precision": precision, "dimensions": dimensions, "normalize": normalize})
    assert r.status_code == 200, r.text
    return r.json()


def _processed(floats, dimensions, normalize: bool) -> np.ndarray:
    """sentence-transformers' order: truncate, then normalise."""
    x = torch.as_tensor(np.asarray(floats, dtype=np.float32))[:, :dimensions]
    return (torch.nn.functional.normalize(x, dim=1) if normalize else x).numpy()


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize(
    "path, dimensions, normalize",
    [("/v1/embeddings", None, True), ("/v1/embeddings", 24, True), ("/embed", 17, False), ("/embed", None, True)],
)
def test_codes_are_sentence_transformers_quantization_of_the_served_floats(
    client, calibration_floats, path, dimensions, normalize, precision
):
    st_quantization = pytest.importorskip("sentence_transformers.quantization")
    floats = np.asarray(_post(client, path, "float32", dimensions, normalize), dtype=np.float32)
    codes = np.asarray(_post(client, path, precision, dimensions, normalize))
    expected = st_quantization.quantize_embeddings(
        floats, precision, calibration_embeddings=_processed(calibration_floats, dimensions, normalize)
    )
    dim = dimensions or 64
    assert codes.shape == ((len(TEXTS), dim) if precision.endswith("int8") else (len(TEXTS), -(-dim // 8)))
    np.testing.assert_array_equal(codes, expected.astype(np.int64))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dimensions", [None, 24])
def test_served_precisions_match_encode(client, tiny_encoder, calibration_floats, precision, dimensions):
    served = np.asarray(_post(client, "/v1/embeddings", precision, dimensions))
    kwargs = {"calibration_embeddings": _processed(calibration_floats, dimensions, True)} if precision.endswith("int8") else {}
    local = tiny_encoder.encode(
        TEXTS, precision=precision, truncate_dim=dimensions, normalize_embeddings=True, convert_to_numpy=True, **kwargs
    )
    assert served.shape == local.shape
    if precision.startswith("float"):
        np.testing.assert_allclose(served, local.astype(np.float32), atol=2e-3 if precision == "float16" else 1e-5)
    elif precision.endswith("int8"):  # a float a hair's breadth from a bucket edge may land one bucket over
        diff = np.abs(served.astype(np.int64) - local.astype(np.int64))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.98
    else:  # sign bits: the same unless a coordinate is ~0
        bits = np.unpackbits(served.astype(np.uint8) ^ local.astype(np.uint8))
        assert bits.mean() < 0.02


def test_float16_is_a_cast_of_the_float32_response(client):
    f32 = np.asarray(_post(client, "/embed", "float32", None), dtype=np.float32)
    f16 = np.asarray(_post(client, "/embed", "float16", None))
    np.testing.assert_array_equal(f16, f32.astype(np.float16).astype(np.float64))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_base64_carries_the_documented_dtype(client, precision):
    as_json = np.asarray(_post(client, "/v1/embeddings", precision, 40))
    encoded = _post(client, "/v1/embeddings", precision, 40, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(s), dtype=PRECISION_DTYPES[precision]) for s in encoded])
    assert decoded.shape == as_json.shape == ((len(TEXTS), 5) if "binary" in precision else (len(TEXTS), 40))
    np.testing.assert_array_equal(decoded.astype(np.float64), as_json.astype(np.float64))


def test_info_reports_precisions_and_calibration(client, tiny_encoder):
    info = client.get("/info").json()
    assert info["precisions"] == list(PRECISIONS) and info["calibration_size"] == len(CALIBRATION)
    bare = create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256))
    with TestClient(bare) as c:
        info = c.get("/info").json()
    assert info["precisions"] == ["float32", "float16", "binary", "ubinary"] and info["calibration_size"] is None


def test_bad_precision_requests_get_clear_4xx(client, tiny_encoder):
    r = client.post("/v1/embeddings", json={"input": "x", "precision": "int4"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "precision" and "'ubinary'" in r.json()["error"]["message"]
    r = client.post("/embed", json={"inputs": "x", "precision": "int8", "dimensions": 65})
    assert r.status_code == 400 and "65 is out of range" in r.json()["error"]
    bare = create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256))
    with TestClient(bare) as c:
        for path, body in (("/v1/embeddings", {"input": ["a", "b"]}), ("/embed", {"inputs": ["a", "b"]})):
            r = c.post(path, json={**body, "precision": "uint8"})
            assert r.status_code == 400
            message = r.json()["error"]["message"] if path.startswith("/v1") else r.json()["error"]
            assert "no calibration set" in message and "--calibration FILE" in message
        r = c.post("/v1/embeddings", json={"input": "a", "precision": "ubinary"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8
    with pytest.raises(ValueError, match="calibration embeddings have 32 dimensions"):
        create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256), CalibrationSet(np.ones((4, 32))))


def test_calibration_set_ranges_follow_truncation_and_normalisation(calibration_floats):
    from llm2vec_fast.quantization import calibration_ranges

    calib = CalibrationSet(calibration_floats)
    np.testing.assert_array_equal(calib.ranges(None, False), calibration_ranges(calibration_floats))
    np.testing.assert_array_equal(calib.ranges(16, True), calibration_ranges(_processed(calibration_floats, 16, True)))
    assert calib.ranges(64, True) is calib.ranges(None, True)  # the full dimension is one setting
    with pytest.raises(ValueError, match="at least two embeddings"):
        CalibrationSet(calibration_floats[:1])
    with pytest.raises(TypeError, match="float embeddings"):
        CalibrationSet(calibration_floats.astype(np.int8))


def test_cli_serve_calibration(tiny_encoder, tmp_path, capsys):
    from llm2vec_fast.cli import main
    from llm2vec_fast.cli.serve import load_calibration

    assert main(["serve", "--calibration", str(tmp_path / "missing.txt")]) == 2
    assert "--calibration file" in capsys.readouterr().err
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(CALIBRATION) + "\n\n")
    calib = load_calibration(tiny_encoder, path, batch_size=8)
    assert len(calib) == len(CALIBRATION) and "24 calibration texts" in capsys.readouterr().err
    np.testing.assert_allclose(calib.embeddings.numpy(), tiny_encoder.encode(CALIBRATION, convert_to_numpy=True), atol=1e-5)
    path.write_text("only one\n")
    with pytest.raises(ValueError, match="at least two texts"):
        load_calibration(tiny_encoder, path, batch_size=8)


def test_cli_serve_wires_the_calibration_into_the_app(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """``llm2vec-fast serve --calibration FILE`` up to the point it would listen: the app it would
    serve answers int8 with the ranges of those texts."""
    import llm2vec_fast.serve as serve_module
    from llm2vec_fast.cli import main

    served = {}
    monkeypatch.setattr(serve_module, "run_server", lambda app, *args: served.setdefault("app", app))
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(CALIBRATION))
    assert main(["serve", "--model", tiny_llama_dir, "--max-length", "128", "--max-batch-tokens", "256", "--calibration", str(path)]) == 0
    assert f"int8/uint8 ranges from {len(CALIBRATION)} calibration texts" in capsys.readouterr().err
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", max_length=128)
    expected = encoder.encode(
        TEXTS[:2],
        precision="int8",
        normalize_embeddings=True,
        convert_to_numpy=True,
        calibration_embeddings=encoder.encode(CALIBRATION, normalize_embeddings=True),
    )
    with TestClient(served["app"]) as c:
        assert c.get("/info").json()["calibration_size"] == len(CALIBRATION)
        r = c.post("/v1/embeddings", json={"input": TEXTS[:2], "precision": "int8"})
    assert r.status_code == 200
    diff = np.abs(np.asarray([d["embedding"] for d in r.json()["data"]]) - expected.astype(np.int64))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.98
