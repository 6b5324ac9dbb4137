"""The FastAPI app in process (``TestClient``) with a tiny random model: a model error fails only
its batch, draining answers 503, the ONNX Runtime encoder serves the same API. The real server on
loopback is tested in ``test_serve.py``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.serve import ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def tiny_encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", max_length=128)


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_model_error_fails_only_its_batch_and_the_server_keeps_serving(tiny_encoder, monkeypatch):
    failures = {"left": 1}
    real = tiny_encoder.embed_items

    def flaky(items, *args, **kwargs):  # fails the first batch only
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("CUDA out of memory (injected)")
        return real(items, *args, **kwargs)

    monkeypatch.setattr(tiny_encoder, "embed_items", flaky)  # this instance only
    app = create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256))
    with TestClient(app) as client:
        bad = client.post("/v1/embeddings", json={"input": ["first"]})
        assert bad.status_code == 500
        assert "model failed" in bad.json()["error"]["message"] and "injected" in bad.json()["error"]["message"]
        good = client.post("/v1/embeddings", json={"input": ["second", "third"]})
        assert good.status_code == 200
        got = [d["embedding"] for d in good.json()["data"]]
        assert _cos(got, real(tiny_encoder.tokenize(["second", "third"]))).min() > 0.99999
        tei = client.post("/embed", json={"inputs": "fourth"})
        assert tei.status_code == 200 and len(tei.json()) == 1
        metrics = client.get("/metrics").text
    assert "llm2vec_batch_failures_total 1.0" in metrics
    assert 'llm2vec_errors_total{endpoint="/v1/embeddings",status="500",type="server_error"} 1.0' in metrics
    assert 'llm2vec_requests_total{endpoint="/v1/embeddings",status="200"} 1.0' in metrics


def test_draining_answers_503_with_retry_after(tiny_encoder):
    app = create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        app.state.draining = True
        for path, body in (("/v1/embeddings", {"input": "x"}), ("/embed", {"inputs": "x"})):
            r = client.post(path, json=body)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "shutting down" in r.text
        assert client.get("/health").status_code == 503
        assert client.get("/metrics").status_code == 200  # still scrapeable while draining


def test_settings_are_checked(tiny_encoder):
    with pytest.raises(ValueError, match="at least the model's max_length"):
        create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=64))
    with pytest.raises(ValueError, match="max_client_batch_size"):
        ServeSettings(model_name="tiny", max_client_batch_size=0)
    assert ServeSettings(model_name="tiny", max_batch_tokens=100).max_queue_tokens == 800


def test_onnx_encoder_is_served_with_the_same_api(tiny_encoder, tmp_path):
    pytest.importorskip("onnxruntime")
    from llm2vec_fast.export import OnnxEncoder, export_onnx

    folder = export_onnx(tiny_encoder, tmp_path / "onnx", precision="fp32", validate=False)
    onnx = OnnxEncoder.from_pretrained(folder)
    texts = ["a short one", "a somewhat longer sentence about embeddings", ""]
    app = create_app(onnx, ServeSettings(model_name="tiny-onnx", max_batch_tokens=256))
    with TestClient(app) as client:
        info = client.get("/info").json()
        assert info["backend"] == "onnxruntime" and info["dimensions"] == tiny_encoder.hidden_size
        r = client.post("/embed", json={"inputs": texts, "normalize": False})
    assert r.status_code == 200
    got = np.array(r.json())
    np.testing.assert_allclose(got, onnx.encode(texts, convert_to_numpy=True), rtol=1e-5, atol=1e-5)
    assert _cos(got, tiny_encoder.encode(texts)).min() > 0.9999


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["serve", "--onnx", "/tmp/x", "--model", "m", "--pooling", "mean"], {}, "--model, --pooling cannot be combined with --onnx"),
        (["serve", "--api-key", " "], {}, "API key is empty"),
        (["serve"], {"LLM2VEC_FAST_API_KEY": ""}, "API key is empty"),
        (["serve", "--port", "70000"], {}, "--port must be in 0..65535"),
        (["serve", "--onnx", "/does/not/exist"], {}, "no model.onnx"),
    ],
)
def test_cli_errors_exit_2_before_serving(argv, env, message, monkeypatch, capsys):
    from llm2vec_fast.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_served_model_names(tiny_encoder):
    """The README's flow: ``serve --model ./my-encoder``, then ``model="my-encoder"`` from the client,
    though the folder records a hub id, which the answers carry."""
    import argparse

    from llm2vec_fast.cli.serve import served_model_names

    class Enc:
        model_id = "org/name"

    args = argparse.Namespace(served_model_name=None, onnx=None, model="./some/dir/my-encoder")
    assert served_model_names(args, Enc()) == ("org/name", ("./some/dir/my-encoder", "my-encoder"))
    Enc.model_id = None
    assert served_model_names(args, Enc()) == ("my-encoder", ("./some/dir/my-encoder",))
    args.model = None
    assert served_model_names(args, Enc()) == ("default", ())
    args.served_model_name = ["custom", "alias", "custom", "alias"]
    assert served_model_names(args, Enc()) == ("custom", ("alias",))

    app = create_app(tiny_encoder, ServeSettings(model_name="org/name", model_aliases=("my-encoder",), max_batch_tokens=256))
    with TestClient(app) as client:
        for sent in ("org/name", "my-encoder", None):
            r = client.post("/v1/embeddings", json={"input": ["a text"], **({"model": sent} if sent else {})})
            assert r.status_code == 200 and r.json()["model"] == "org/name", r.text
        refused = client.post("/v1/embeddings", json={"input": ["a text"], "model": "other"})
        assert refused.status_code == 400 and "'other' is not served" in refused.text
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["org/name"]


def test_over_long_prompt_gets_413_unless_truncate(tiny_encoder):
    app = create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256))
    long_instruction = " ".join(f"instr{i}" for i in range(200))
    body = {"inputs": ["short text"], "instruction": long_instruction, "normalize": False}
    with TestClient(app) as client:
        refused = client.post("/embed", json=body)
        assert refused.status_code == 413
        assert "inputs[0] is over 128 tokens with its instruction" in refused.json()["error"]
        served = client.post("/embed", json={**body, "truncate": True})
    assert served.status_code == 200
    want = tiny_encoder.encode([[long_instruction, "short text"]])
    assert _cos(served.json(), want).min() > 0.99999


@pytest.fixture(scope="module")
def tiny_packable_dir(tmp_path_factory, smollm_tokenizer):
    """A tiny random Llama whose head dim (32) the varlen attention takes."""
    import torch
    from conftest import tiny_config
    from transformers import AutoModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-hd32")
    AutoModel.from_config(tiny_config("llama", hidden_size=128, head_dim=32)).save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    return str(path)


def test_cpu_server_runs_packed_batches_equal_to_padded_encode(tiny_packable_dir):
    """On CPU a bidirectional torch encoder is served through the packed path (one padding-free forward
    per batch), with the embeddings of the padded encode(); packed=False keeps padded batches."""
    texts = ["a short one", "a much longer sentence about packed batches on a CPU", "", "mid length text here"]
    reference = LLM2Vec.from_pretrained(tiny_packable_dir, device="cpu", max_length=128)
    want = reference.encode(texts, convert_to_numpy=True)
    for packed, expected in ((None, True), (False, False)):
        served = LLM2Vec.from_pretrained(tiny_packable_dir, device="cpu", max_length=128)
        app = create_app(served, ServeSettings(model_name="tiny", max_batch_tokens=256, packed=packed))
        with TestClient(app) as client:
            assert client.get("/info").json()["packed"] is expected
            got = np.asarray(client.post("/embed", json={"inputs": texts, "normalize": False}).json())
        assert served.use_packed is expected
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert _cos(got, want).min() > 0.99999


def test_packed_is_refused_where_it_cannot_run(tiny_encoder):
    with pytest.raises(ValueError, match="head dim 16"):
        create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256, packed=True))
    create_app(tiny_encoder, ServeSettings(model_name="tiny", max_batch_tokens=256))  # auto: padded, no error
    assert tiny_encoder.use_packed is False


def test_a_family_not_tested_packed_is_served_padded(smollm_tokenizer):
    """transformers' Falcon drops the packing kwargs before its layers: the server serves it with
    padded batches (it packed every bidirectional model, and the packed forward refuses Falcon)."""
    import torch
    import transformers
    from transformers import AutoModel

    from llm2vec_fast import enable_bidirectional
    from llm2vec_fast.serve.app import why_not_packed

    config = transformers.FalconConfig(vocab_size=49152, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    encoder = LLM2Vec(enable_bidirectional(AutoModel.from_config(config).eval()), smollm_tokenizer, max_length=64)
    assert "falcon is not one of the families tested on the packed path" in why_not_packed(encoder)
    app = create_app(encoder, ServeSettings(model_name="falcon", max_batch_tokens=256))
    with TestClient(app) as client:
        r = client.post("/embed", json={"inputs": ["a text", "another, longer text"], "normalize": False})
        assert r.status_code == 200, r.text
        assert client.get("/info").json()["packed"] is False
    torch.testing.assert_close(torch.tensor(r.json()), encoder.encode(["a text", "another, longer text"]), atol=1e-5, rtol=1e-5)
