"""``llm2vec-fast serve`` as a real server on 127.0.0.1 (a subprocess), with the embedded default
model: OpenAI-client and /embed parity with ``LLM2Vec.encode``, dimensions and base64, every bad
input, 32 concurrent clients, API-key auth, overload, client disconnects and SIGTERM draining.

Every request has a timeout, every load is bounded, and every server is killed at the end.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

STARTUP_TIMEOUT = 180
REQUEST_TIMEOUT = 300  # generous: CI machines are small and often shared
API_KEY = "test-secret"
MIN_COS = 0.99999

TEXTS = [
    "The cat sits on the mat.",
    "A man is playing a guitar on a stage in front of a small crowd.",
    "Embeddings turn text into vectors.",
    "Ünïcödé, emoji 🚀 and punctuation!?",
    "short",
    " ".join(["long"] * 40) + " sentence with many repeated words",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates again.",
    "How do I reset my password?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``llm2vec-fast serve`` in a subprocess on a free loopback port; its log goes to a file."""

    def __init__(self, args: list[str], log_dir: Path, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"serve-{self.port}.log"
        cmd = [
            sys.executable,
            "-c",
            "import sys; from llm2vec_fast.cli import main; sys.exit(main())",
            "serve",
            "--port",
            str(self.port),
            *args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY in args else {}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT} s:\n{self.log.read_text()[-3000:]}")

    def post(self, path: str, json, timeout: float = REQUEST_TIMEOUT, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=json, headers={**self.headers, **kw.pop("headers", {})}, timeout=timeout, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^([a-zA-Z0-9_:]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def _wait_for(condition, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    srv = Server(["--model", default_model_dir, "--max-client-batch-size", "64"], tmp_path_factory.mktemp("serve"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def expected(default_encoder):
    return default_encoder.encode(TEXTS, convert_to_numpy=True)


@pytest.fixture(scope="module")
def client(server):
    model = httpx.get(f"{server.url}/info", timeout=10).json()["model"]
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0), model


# ---------------------------------------------------------------------------------------- parity
def test_openai_client_matches_encode(client, expected, default_encoder):
    oa, model = client
    resp = oa.embeddings.create(model=model, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in resp.data])
    assert got.shape == expected.shape and cos(got, expected).min() >= MIN_COS
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    tokens = sum(len(x.input_ids) for x in default_encoder.tokenize(TEXTS))
    assert resp.usage.prompt_tokens == tokens == resp.usage.total_tokens and resp.model == model
    single = oa.embeddings.create(model=model, input=TEXTS[2], encoding_format="float")
    assert len(single.data) == 1 and cos(single.data[0].embedding, expected[2]) >= MIN_COS
    assert [m.id for m in oa.models.list().data] == [model]


def test_dimensions_and_base64(server, client, expected):
    oa, model = client
    as_float = server.post("/v1/embeddings", {"input": TEXTS, "model": model, "dimensions": 64}).json()
    as_b64 = server.post("/v1/embeddings", {"input": TEXTS, "model": model, "dimensions": 64, "encoding_format": "base64"}).json()
    floats = np.array([d["embedding"] for d in as_float["data"]])
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in as_b64["data"]])
    assert floats.shape == decoded.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(decoded, floats, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=1), 1.0, rtol=1e-5)  # truncated, then re-normalised
    assert cos(decoded, expected[:, :64]).min() >= MIN_COS
    via_client = oa.embeddings.create(model=model, input=TEXTS[:2], dimensions=64)
    np.testing.assert_allclose(np.array([d.embedding for d in via_client.data]), decoded[:2], rtol=1e-5, atol=1e-6)


def test_embed_matches_encode(server, expected, default_encoder):
    raw = server.post("/embed", {"inputs": TEXTS, "normalize": False})
    assert raw.status_code == 200
    got = np.array(raw.json())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert cos(got, expected).min() >= MIN_COS
    normalized = np.array(server.post("/embed", {"inputs": TEXTS[0]}).json())
    assert normalized.shape == (1, expected.shape[1]) and abs(np.linalg.norm(normalized) - 1) < 1e-5


def test_instructions_match_encode_pairs(server, client, default_encoder):
    oa, model = client
    instruction = "Retrieve passages that answer the question:"
    want = default_encoder.encode([[instruction, t] for t in TEXTS[:3]], convert_to_numpy=True)
    tei = np.array(server.post("/embed", {"inputs": TEXTS[:3], "instruction": instruction, "normalize": False}).json())
    pairs = oa.embeddings.create(model=model, input=[[instruction, t] for t in TEXTS[:3]])
    extension = oa.embeddings.create(model=model, input=TEXTS[:3], extra_body={"instruction": instruction})
    for got in (tei, [d.embedding for d in pairs.data], [d.embedding for d in extension.data]):
        assert cos(got, want).min() >= MIN_COS
    assert cos(tei, default_encoder.encode(TEXTS[:3])).max() < 0.9999  # the instruction changed the embedding


def test_empty_string_is_embedded_as_encode_does(server, default_encoder):
    r = server.post("/embed", {"inputs": ["", "x"], "normalize": False})
    assert r.status_code == 200
    assert cos(r.json(), default_encoder.encode(["", "x"])).min() >= MIN_COS


def test_truncation(server, default_encoder):
    long_text = " ".join(f"word{i}" for i in range(600))
    r = server.post("/v1/embeddings", {"input": ["fine", long_text]})
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "input[1]" in message and "400 text tokens" in message and "512 tokens" in message and "truncate=true" in message
    r = server.post("/embed", {"inputs": long_text})
    assert r.status_code == 413 and "inputs[0] has" in r.json()["error"] and "truncate=true" in r.json()["error"]
    ok = server.post("/embed", {"inputs": [long_text], "truncate": True, "normalize": False})
    assert ok.status_code == 200 and cos(ok.json(), default_encoder.encode([long_text])).min() >= MIN_COS


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/embeddings", {"input": []}, 422, "empty list"),
        ("/v1/embeddings", {}, 422, "input"),
        ("/v1/embeddings", {"input": ["ok", 3.5]}, 422, "input[1] must be a string"),
        ("/v1/embeddings", {"input": {"text": "x"}}, 422, "must be a string or a list of strings"),
        ("/v1/embeddings", {"input": [1, 2, 3]}, 422, "token ids"),
        ("/v1/embeddings", {"input": [["instruction", "text", "extra"]]}, 422, "[instruction, text] pair"),
        ("/v1/embeddings", {"input": ["x"] * 65}, 413, "at most 64"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, "'float' or 'base64'"),
        ("/v1/embeddings", {"input": "x", "dimensions": 0}, 422, "dimensions"),
        ("/v1/embeddings", {"input": "x", "dimensions": 577}, 400, "576 dimensions"),
        ("/v1/embeddings", {"input": "x", "model": "gpt-4"}, 400, "'gpt-4' is not served"),
        ("/embed", {"inputs": []}, 422, "empty list"),
        ("/embed", {"inputs": [None]}, 422, "inputs[0] must be a string"),
        ("/embed", {"inputs": ["x"] * 65}, 413, "at most 64"),
        ("/embed", {"inputs": "x", "normalize": "maybe"}, 422, "normalize"),
    ],
)
def test_bad_input_gets_a_clear_json_error(server, path, body, status, message):
    r = server.post(path, body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    text = error["message"] if path.startswith("/v1/") else error
    assert message in text, text


def test_malformed_body_and_openai_client_errors(server, client):
    r = httpx.post(f"{server.url}/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 422 and "request body is not valid JSON" in error["message"] and error["param"] is None, error
    r = httpx.post(f"{server.url}/embed", content=b'{"inputs": ["x"', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "request body is not valid JSON" in r.json()["error"], r.text
    oa, model = client
    with pytest.raises(openai.BadRequestError, match="not served"):
        oa.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.UnprocessableEntityError, match="empty list"):
        oa.embeddings.create(model=model, input=[])


def test_health_and_info(server):
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["dimensions"] == 576 and info["pooling"] == "mean" and info["max_length"] == 512
    assert info["backend"] == "torch" and info["device"] == "cpu" and info["packed"] is True  # packed batches on CPU too
    assert info["max_batch_tokens"] == 16384 and info["max_client_batch_size"] == 64 and info["auth"] is False


# ------------------------------------------------------------------------------- concurrency
def test_32_concurrent_clients_get_their_own_results_in_order(server, default_encoder):
    rng = np.random.default_rng(0)
    pool = [" ".join(f"w{j}" for j in range(int(n))) + f" text {i}" for i, n in enumerate(rng.integers(1, 12, size=48))]
    want = default_encoder.encode(pool, convert_to_numpy=True)
    requests = [[int(k) for k in rng.choice(len(pool), size=int(rng.integers(1, 5)), replace=False)] for _ in range(32)]
    before = server.metrics()
    start = threading.Barrier(32, timeout=60)

    def client(c: int) -> list[tuple[list[int], np.ndarray]]:
        out = []
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            start.wait()
            for idx in requests[c::32]:  # one request per client
                r = http.post(f"{server.url}/v1/embeddings", json={"input": [pool[k] for k in idx], "encoding_format": "float"})
                assert r.status_code == 200, r.text
                data = r.json()["data"]
                assert [d["index"] for d in data] == list(range(len(idx)))
                out.append((idx, np.array([d["embedding"] for d in data])))
        return out

    with ThreadPoolExecutor(32) as ex:
        results = [x for chunk in ex.map(client, range(32), timeout=2 * REQUEST_TIMEOUT) for x in chunk]
    assert len(results) == 32
    for idx, got in results:
        assert cos(got, want[idx]).min() >= MIN_COS
    after = server.metrics()
    batches = after["llm2vec_batch_requests_count"] - before["llm2vec_batch_requests_count"]
    single = after['llm2vec_batch_requests_bucket{le="1.0"}'] - before['llm2vec_batch_requests_bucket{le="1.0"}']
    merged = after["llm2vec_batch_requests_sum"] - before["llm2vec_batch_requests_sum"]
    assert merged == 32 and batches < 32 and batches - single >= 1  # some batches held more than one request
    assert after['llm2vec_requests_total{endpoint="/v1/embeddings",status="200"}'] >= 32
    assert after["llm2vec_queue_tokens"] == 0 and after["llm2vec_requests_in_flight"] == 0
    assert after["llm2vec_embedded_tokens_total"] > before["llm2vec_embedded_tokens_total"]


def test_a_slow_client_does_not_block_the_others(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
        # headers and half a body, then nothing: the server must keep serving everyone else
        slow.sendall(
            b'POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{"inputs": ["never finished'
        )
        r = server.post("/embed", {"inputs": ["meanwhile"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()) == 1


# ------------------------------------------------------------- auth, overload, disconnects
@pytest.fixture(scope="module")
def limited(default_model_dir, tmp_path_factory):
    srv = Server(
        [
            "--model",
            default_model_dir,
            "--max-length",
            "32",
            "--max-batch-tokens",
            "32",
            "--max-queue-tokens",
            "1024",
            "--max-concurrent-requests",
            "4",
            "--api-key",
            API_KEY,
        ],
        tmp_path_factory.mktemp("serve-limited"),
    )
    yield srv
    srv.close()


BIG = [" ".join(f"t{i}x{j}" for j in range(16)) for i in range(32)]  # 32 texts of 32 tokens (truncated): 32 batches, 1024 tokens


def test_api_key(limited):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(f"{limited.url}/v1/embeddings", json={"input": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]["message"]
    assert httpx.get(f"{limited.url}/health", timeout=10).status_code == 401
    assert httpx.get(f"{limited.url}/metrics", timeout=10).status_code == 401
    assert (
        httpx.post(f"{limited.url}/embed", json={"inputs": "x"}, headers={"Authorization": f"bearer {API_KEY}"}, timeout=30).status_code
        == 200
    )
    oa = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT, max_retries=0)
    assert len(oa.embeddings.create(model=httpx.get(f"{limited.url}/info", headers=limited.headers).json()["model"], input="x").data) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{limited.url}/v1", api_key="nope", max_retries=0).embeddings.create(model="m", input="x")


def test_full_queue_gets_429_with_retry_after(limited):
    other = [t.replace("t", "u") for t in BIG]
    start = threading.Barrier(2, timeout=30)

    def send(texts):
        start.wait()
        return limited.post("/embed", {"inputs": texts, "truncate": True})

    with ThreadPoolExecutor(2) as ex:  # 2 x 1024 tokens > --max-queue-tokens 1024: the second in is refused
        responses = list(ex.map(send, [BIG, other], timeout=REQUEST_TIMEOUT))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 429], [r.text for r in responses]
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["error"]
    assert limited.post("/embed", {"inputs": other, "truncate": True}).status_code == 200  # served once there is room
    too_big = limited.post("/embed", {"inputs": BIG + other[:1], "truncate": True})
    assert too_big.status_code == 413 and "--max-queue-tokens" in too_big.json()["error"]


def test_too_many_concurrent_requests_get_429(limited):
    with ThreadPoolExecutor(1) as ex:
        big = ex.submit(limited.post, "/embed", {"inputs": BIG, "truncate": True})
        _wait_for(lambda: limited.metrics()["llm2vec_queue_tokens"] > 0, what="the big request to queue")
        start = threading.Barrier(6, timeout=30)

        def small(i):
            start.wait()
            return limited.post("/embed", {"inputs": [f"small {i}"]})

        with ThreadPoolExecutor(6) as ex2:
            codes = [r.status_code for r in ex2.map(small, range(6), timeout=REQUEST_TIMEOUT)]
        assert big.result(timeout=REQUEST_TIMEOUT).status_code == 200
    assert codes.count(429) >= 3 and set(codes) <= {200, 429}, codes  # 1 big + at most 3 small in flight


def test_client_disconnect_frees_its_queue_slot(limited):
    before = limited.metrics()
    with pytest.raises(httpx.ReadTimeout):
        limited.post("/embed", {"inputs": BIG, "truncate": True}, timeout=httpx.Timeout(10, read=0.5))
    after = _wait_for(lambda: (m := limited.metrics())["llm2vec_requests_in_flight"] == 0 and m, what="the request to end")
    assert after["llm2vec_queue_tokens"] == 0 and after["llm2vec_queue_requests"] == 0
    assert (
        after.get('llm2vec_requests_total{endpoint="/embed",status="499"}', 0)
        - before.get('llm2vec_requests_total{endpoint="/embed",status="499"}', 0)
        == 1
    )
    embedded = after["llm2vec_embedded_texts_total"] - before["llm2vec_embedded_texts_total"]
    assert embedded < len(BIG)  # the rest of its texts left the queue uncomputed
    assert limited.post("/embed", {"inputs": ["still serving"]}).status_code == 200


# ----------------------------------------------------------------------------------- SIGTERM
# Keep this test last: it stops the `limited` server (saves starting one more on CI).
def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(limited, default_encoder):
    srv = limited
    try:
        texts = [[f"request {r} text {i}: " + " ".join(f"v{j}" for j in range(8)) for i in range(8)] for r in range(3)]
        with ThreadPoolExecutor(3) as ex:  # 3 x 8 texts of <= 32 tokens, batches of 32 tokens: 24 batches
            futures = [ex.submit(srv.post, "/embed", {"inputs": t, "normalize": False}) for t in texts]
            _wait_for(lambda: srv.metrics()["llm2vec_requests_in_flight"] == 3, what="3 requests in flight")
            srv.proc.send_signal(signal.SIGTERM)
            refused = _wait_for(lambda: _refused(srv), timeout=20, what="new requests to be refused")
            responses = [f.result(timeout=REQUEST_TIMEOUT) for f in futures]
        assert refused
        for t, r in zip(texts, responses):
            assert r.status_code == 200
            assert cos(r.json(), default_encoder.encode(t)).min() >= MIN_COS
        # uvicorn re-raises the signal after a clean drain, so the exit status is "terminated by SIGTERM"
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in srv.log.read_text()
    finally:
        srv.close()


def _refused(srv: Server) -> bool:
    try:
        r = srv.post("/embed", {"inputs": "new"}, timeout=5)
    except httpx.TransportError:  # the listening socket is closed
        return True
    assert r.status_code == 503, r.status_code  # a request that got in while draining is refused, never served
    return True
