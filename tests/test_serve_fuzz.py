"""Schemathesis fuzzes the server from its own ``/openapi.json``: a real uvicorn server on 127.0.0.1 in a
thread, serving a tiny random model. Every route gets a bounded number of generated requests, valid
and schema-violating (negative mode), with a fixed seed; no answer may be a 5xx, every error must be
the documented JSON (the schema's error models), and the server must still be healthy and embed
correctly afterwards. Oversized, malformed and headerless bodies are sent by hand as well."""

from __future__ import annotations

import socket
import threading
import time

import hypothesis
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.serve import ServeSettings, create_app  # noqa: E402

MAX_EXAMPLES = 25  # per route and generation mode: ~1 minute for the whole file on 2 cores
SEED = 20
MAX_REQUEST_BYTES = 64 * 1024
MAX_CLIENT_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", max_length=128)


@pytest.fixture(scope="module")
def live_server(tiny_encoder):
    """Base URL of the app under uvicorn on 127.0.0.1 (lifespan on: the batcher runs)."""
    settings = ServeSettings(
        model_name="tiny",
        max_batch_tokens=256,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_client_batch_size=MAX_CLIENT_BATCH,
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_encoder, settings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fuzzing server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


def check_error_body(path: str, response) -> None:
    """An error is JSON in the route family's documented shape."""
    body = response.json()
    if path.startswith("/v1/"):
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"], body
        assert isinstance(body["error"]["type"], str)
    else:
        assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"], body


# GET routes take no parameters: nothing to make schema-violating, so they are fuzzed in positive mode only
ROUTES = ["POST /v1/embeddings", "POST /embed", "GET /health", "GET /info", "GET /v1/models", "GET /metrics"]


@pytest.mark.parametrize("route, mode", [(r, "positive") for r in ROUTES] + [(r, "negative") for r in ROUTES if r.startswith("POST")])
def test_fuzzed_requests_get_no_5xx_and_documented_errors(api_schema, live_server, route, mode):
    """Generated requests (negative: bodies that violate the schema) from a fixed seed; the schema's
    own checks run on each answer too (documented status, body of the documented model, content type,
    schema-violating data rejected). Not "schema-valid data accepted": the schema cannot say which model
    name, dimension count, batch size or precision this server's settings take, so a valid-looking
    request may get a documented 400/413."""
    method, path = route.split(" ")
    operation = api_schema[path][method]
    seen = []

    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[hypothesis.Phase.generate],  # no shrinking: a failure names its request below
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def fuzz(case):
        response = case.call(base_url=live_server, timeout=60)
        seen.append(response.status_code)
        where = f"{case.method} {case.path} body={getattr(case, 'body', None)!r:.300} -> {response.status_code}: {response.text[:300]}"
        assert response.status_code < 500, where
        if response.status_code >= 400:
            check_error_body(case.path, response)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    fuzz()
    assert seen, "no request was generated"
    if mode == "negative" and method == "POST":
        assert any(400 <= s < 500 for s in seen), "the negative mode never produced an invalid request"


@pytest.mark.parametrize(
    "body, headers, status",
    [
        (b"x" * (MAX_REQUEST_BYTES + 1), {"Content-Type": "application/json"}, 413),  # oversized
        (b'{"input": ["unterminated', {"Content-Type": "application/json"}, 422),  # malformed JSON
        (b"\xff\xfe\x00not utf-8", {"Content-Type": "application/json"}, 422),
        (
            b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            {"Content-Type": "application/json"},
            400,
        ),  # nesting over json's recursion limit
        (b'{"input": ' + str(["t"] * (MAX_CLIENT_BATCH + 1)).replace("'", '"').encode() + b"}", {"Content-Type": "application/json"}, 413),
        (b'{"input": "a text"}', {"Content-Type": "text/plain"}, 422),
    ],
    ids=["oversized", "truncated-json", "not-utf8", "deep-nesting", "too-many-texts", "wrong-content-type"],
)
@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed"])
def test_malformed_and_oversized_bodies_get_documented_errors(live_server, path, body, headers, status):
    if path == "/embed":
        body = body.replace(b'"input"', b'"inputs"')
    response = requests.post(live_server + path, data=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:300]
    check_error_body(path, response)


def test_body_without_content_length_gets_411(live_server):
    def chunks():
        yield b'{"input": "chunked"}'

    response = requests.post(live_server + "/v1/embeddings", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 411
    check_error_body("/v1/embeddings", response)


def test_unknown_route_and_method_get_documented_errors(live_server):
    for method, path, status in (
        ("GET", "/nope", 404),
        ("GET", "/v1/nope", 404),
        ("GET", "/embed", 405),
        ("DELETE", "/v1/embeddings", 405),
    ):
        response = requests.request(method, live_server + path, timeout=30)
        assert response.status_code == status, response.text
        check_error_body(path, response)


def test_server_is_healthy_and_correct_after_fuzzing(live_server, tiny_encoder):
    # runs after the fuzzing tests in this module (pytest keeps file order)
    assert requests.get(live_server + "/health", timeout=30).status_code == 200
    texts = ["still serving", "after the fuzzer"]
    response = requests.post(live_server + "/embed", json={"inputs": texts, "normalize": False}, timeout=60)
    assert response.status_code == 200
    got = np.asarray(response.json())
    np.testing.assert_allclose(got, tiny_encoder.encode(texts, convert_to_numpy=True), rtol=1e-4, atol=1e-4)
    metrics = requests.get(live_server + "/metrics", timeout=30).text
    assert "llm2vec_requests_in_flight 0.0" in metrics and "llm2vec_queue_requests 0.0" in metrics
    assert 'status="500"' not in metrics and 'status="503"' not in metrics
