"""The FastAPI application: OpenAI-compatible ``/v1/embeddings``, TEI-style ``/embed``, ``/health``,
``/info``, ``/v1/models`` and Prometheus ``/metrics``.

Request path: validate (pydantic) -> tokenise in a dedicated thread (the encoder's own
``tokenize``, so prompts, instructions and truncation match ``encode()``) -> queue in the
:class:`~llm2vec_fast.serve.batcher.Batcher` -> wait for the embeddings while watching for the client
to disconnect -> truncate / normalise / quantize / serialise (orjson, from numpy; in a thread when
large) -> respond. The event loop never runs the model, the tokenizer or a large JSON encoder, so a
slow request never blocks the others.

Errors are JSON: ``{"error": {"message", "type", "param", "code"}}`` under ``/v1`` (what the
``openai`` client parses), ``{"error": ..., "error_type": ...}`` elsewhere (text-embeddings-inference).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from ..bidirectional import SUPPORTED_MODEL_TYPES, is_bidirectional, is_supported_family
from ..kernels.flash_attn import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from ..packing import DEFAULT_MAX_TOKENS_PER_BATCH
from ..prompting import EncodingInput
from ..quantization import PRECISION_DTYPES, PRECISIONS, SCALAR_PRECISIONS, CalibrationSet, quantize_embeddings, truncate_and_normalize
from .batcher import DEFAULT_REGROUP_MS, Batcher, BatcherStopped, QueueFull
from .metrics import ServerMetrics
from .schemas import (
    GUARD_STATUSES,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbedRequest,
    Info,
    ModelCard,
    ModelList,
    OpenAIError,
    TEIError,
    error_responses,
)

logger = logging.getLogger(__name__)

EMBEDDING_ENDPOINTS = ("/v1/embeddings", "/embed")
KNOWN_ENDPOINTS = EMBEDDING_ENDPOINTS + ("/health", "/info", "/metrics", "/v1/models")
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away"; never reaches a client
DRAIN_RETRY_AFTER_S = 5
INLINE_RESPONSE_VALUES = 8192  # embeddings x dimensions serialised on the event loop itself; larger go to a thread


@dataclass
class ServeSettings:
    """Limits and identity of a server (``llm2vec-fast serve`` options)."""

    model_name: str
    model_aliases: tuple[str, ...] = ()  # other names /v1/embeddings accepts (answers carry model_name)
    max_batch_tokens: int = DEFAULT_MAX_TOKENS_PER_BATCH
    max_client_batch_size: int = 256
    max_queue_tokens: int | None = None  # default: 8 batches
    max_concurrent_requests: int = 512
    max_request_bytes: int = 32 * 2**20
    batch_size: int = 32  # texts per padded forward (ONNX Runtime, causal models); the packed path uses the token budget
    packed: bool | None = None  # one padding-free forward per batch; None: whenever the torch encoder is bidirectional
    regroup_ms: float = DEFAULT_REGROUP_MS  # after a batch, wait this long at most for the clients just answered (see Batcher)
    api_key: str | None = None
    model_path: str | None = None

    def __post_init__(self) -> None:
        if self.max_queue_tokens is None:
            self.max_queue_tokens = 8 * self.max_batch_tokens
        for name in (
            "max_batch_tokens",
            "max_client_batch_size",
            "max_queue_tokens",
            "max_concurrent_requests",
            "max_request_bytes",
            "batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.regroup_ms >= 0:
            raise ValueError(f"regroup_ms must be >= 0, got {self.regroup_ms!r}")


class ServeError(Exception):
    """An error answered as JSON with ``status`` (and optional headers such as ``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_response(path: str, err: ServeError) -> JSONResponse:
    if path.startswith("/v1/"):
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    else:
        body = {"error": err.message, "error_type": err.type}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def backend_of(encoder) -> str:
    return "torch" if isinstance(encoder, torch.nn.Module) else "onnxruntime"


def tokenize_pairs(encoder, pairs: list[tuple[str, str]], truncate: bool) -> tuple[list[EncodingInput], list[str]]:
    """Tokenise with the encoder's own ``tokenize`` (what ``encode()`` does); with ``truncate=False`` also
    describe the inputs the encoder would cut (text over ``doc_max_length`` tokens, or the whole
    prompt over ``max_length``) as ``"[i] has N text tokens"``."""
    items = encoder.tokenize([[ins, text] if ins else text for ins, text in pairs])
    if truncate:
        return items, []
    text_lengths = [len(ids) for ids in encoder.tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]]
    problems = []
    for i, (item, n) in enumerate(zip(items, text_lengths)):
        if n > encoder.doc_max_length or item.truncated:
            problems.append(
                f"[{i}] has {n} text tokens"
                if n > encoder.doc_max_length
                else f"[{i}] is over {encoder.max_length} tokens with its instruction"
            )
    return items, problems


def postprocess(
    emb: torch.Tensor, dimensions: int | None, normalize: bool, precision: str = "float32", calibration: CalibrationSet | None = None
) -> np.ndarray:
    """Keep the first ``dimensions`` (Matryoshka-style), L2-normalise if asked, then quantize to
    ``precision`` (int8/uint8 buckets from ``calibration`` put through the same truncation and
    normalisation): what ``encode(truncate_dim=..., normalize_embeddings=..., precision=...,
    calibration_embeddings=...)`` returns."""
    emb = truncate_and_normalize(emb, dimensions, normalize)
    ranges = calibration.ranges(dimensions, normalize) if precision in SCALAR_PRECISIONS else None
    return quantize_embeddings(emb, precision, ranges=ranges)


def json_numbers(emb: np.ndarray) -> np.ndarray:
    """``emb`` ready for orjson: float rows as float64, so each JSON number is the exact float32 (or
    float16) value, as ``tolist()`` + ``json`` wrote it (orjson writes float32 in its shortest float32
    form, which a float64 parser reads as a different number); integer codes as they are."""
    return np.ascontiguousarray(emb, dtype=np.float64 if emb.dtype.kind == "f" else None)


def openai_body(emb: np.ndarray, encoding_format: str, model: str, prompt_tokens: int, precision: str = "float32") -> bytes:
    if encoding_format == "base64":  # each row's bytes in its precision's dtype (float32: OpenAI's little-endian <f4)
        dtype = PRECISION_DTYPES[precision]
        vectors = [base64.b64encode(row.astype(dtype, copy=False).tobytes()).decode("ascii") for row in emb]
    else:
        vectors = list(json_numbers(emb))
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage}, option=orjson.OPT_SERIALIZE_NUMPY)


def tei_body(emb: np.ndarray) -> bytes:
    return orjson.dumps(json_numbers(emb), option=orjson.OPT_SERIALIZE_NUMPY)


async def off_loop_if_large(emb: torch.Tensor, make_body: Callable[[], bytes]) -> bytes:
    """``make_body()`` (post-process and serialise), in a thread when ``emb`` is large so one big
    response never stalls the event loop; small ones inline, where a thread hop would cost more
    than the work (tens of microseconds for one vector)."""
    if emb.numel() <= INLINE_RESPONSE_VALUES:
        return make_body()
    return await asyncio.to_thread(make_body)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read, so ``receive``
    yields nothing else)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


class GuardMiddleware:
    """Pure ASGI middleware in front of every route: API key, draining, concurrency and body-size
    limits, and the request metrics (status and latency per endpoint)."""

    def __init__(self, app, state):
        self.app = app
        self.state = state  # the FastAPI app's state: settings, metrics, draining, in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        settings: ServeSettings = self.state.settings
        metrics: ServerMetrics = self.state.metrics
        started = time.perf_counter()
        status = {"code": 500, "type": None}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reply(err: ServeError):
            status["type"] = err.type
            await error_response(path, err)(scope, receive, send_wrapper)

        counted = False
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if settings.api_key is not None and not _authorized(headers.get("authorization"), settings.api_key):
                return await reply(
                    ServeError(
                        401,
                        "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        "authentication_error",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                )
            if self.state.draining and path != "/metrics":
                return await reply(
                    ServeError(503, "the server is shutting down", "server_unavailable", headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})
                )
            if path in EMBEDDING_ENDPOINTS and scope["method"] == "POST":
                length = headers.get("content-length")
                if length is None:
                    return await reply(ServeError(411, "send the body with a Content-Length header", code="length_required"))
                if not length.isdigit():
                    return await reply(ServeError(400, f"bad Content-Length header {length!r}", code="bad_request"))
                if int(length) > settings.max_request_bytes:
                    return await reply(
                        ServeError(
                            413,
                            f"the body has {int(length)} bytes; this server takes at most "
                            f"{settings.max_request_bytes} (--max-request-bytes)",
                            code="request_too_large",
                        )
                    )
                if self.state.in_flight >= settings.max_concurrent_requests:
                    return await reply(
                        ServeError(
                            429,
                            f"too many concurrent requests (limit {settings.max_concurrent_requests}); retry later",
                            "rate_limit_error",
                            code="too_many_requests",
                            headers={"Retry-After": str(self.state.batcher.retry_after())},
                        )
                    )
                self.state.in_flight += 1
                metrics.in_flight.inc()
                counted = True
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.state.in_flight -= 1
                metrics.in_flight.dec()
            if endpoint != "/metrics":
                error_type = status["type"] or scope.get("llm2vec_error_type")
                metrics.observe_request(endpoint, status["code"], time.perf_counter() - started, error_type)


def _authorized(header: str | None, api_key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def why_not_packed(encoder) -> str | None:
    """Why the packed path cannot run ``encoder`` (``None`` when it can): it needs a bidirectional
    torch encoder whose head dim and dtype the varlen attention takes."""
    if not (isinstance(encoder, torch.nn.Module) and hasattr(encoder, "packed")):
        return "not a torch LLM2Vec encoder (ONNX Runtime pads its batches)"
    if not is_bidirectional(encoder.model):
        return "the model is causal (--no-bidirectional); the packed path is bidirectional"
    config = encoder.config
    if not is_supported_family(encoder.model):
        return f"{config.model_type} is not one of the families tested on the packed path ({', '.join(SUPPORTED_MODEL_TYPES)})"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} is not one of the varlen attention's {SUPPORTED_HEAD_DIMS}"
    dtype = next(encoder.parameters()).dtype
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not one of the varlen attention's {SUPPORTED_DTYPES}"
    return None


def configure_batches(encoder, settings: ServeSettings) -> None:
    """Make ``encoder.embed_items`` run each batcher batch as the server wants: with ``packed`` (the
    default for a bidirectional torch encoder, on CPU too) as one padding-free forward under the
    token budget; otherwise (ONNX Runtime, a causal model, ``packed=False``) as length-sorted padded
    forwards of ``batch_size`` texts.

    Why packed on CPU: the batcher's batches hold whatever texts are queued, in arrival order; padded,
    they carry ~2.6x the real tokens on STS-B sentences (``encode()`` over a whole corpus sorts by
    length first and pads to ~1.2x), and the server ran at half of ``encode()``. The packed forward
    does no padding work at all, whatever the mix of lengths. The encoder is the server's own: its
    ``packed`` and ``max_tokens_per_batch`` are set here."""
    reason = why_not_packed(encoder)
    if settings.packed and reason:
        raise ValueError(f"packed batches cannot serve this encoder: {reason}")
    can_pack = reason is None
    if hasattr(encoder, "max_tokens_per_batch"):
        encoder.max_tokens_per_batch = settings.max_batch_tokens  # one packed forward per batcher batch
    if hasattr(encoder, "packed"):
        encoder.packed = can_pack if settings.packed is None else settings.packed


def create_app(encoder, settings: ServeSettings, calibration: CalibrationSet | None = None) -> FastAPI:
    """The ASGI app serving ``encoder`` (an ``LLM2Vec`` or an ``OnnxEncoder``) under ``settings``.

    ``calibration``: float embeddings of the encoder (full dimension, not normalised) whose
    per-dimension ranges set the buckets of ``precision="int8"`` / ``"uint8"`` requests, for any
    ``dimensions`` / ``normalize`` (``llm2vec-fast serve --calibration FILE`` embeds those texts at
    start). Without it those precisions are answered 400: ranges computed from each request would
    make codes of different requests incomparable.

    Starting it (lifespan) starts the batcher; a server runner sets ``app.state.draining = True`` on
    SIGTERM so new requests get 503 while in-flight ones finish.
    """
    if settings.max_batch_tokens < encoder.max_length:
        raise ValueError(
            f"max_batch_tokens ({settings.max_batch_tokens}) must be at least the model's max_length "
            f"({encoder.max_length}) so any text fits a batch"
        )
    hidden = int(encoder.hidden_size)
    if calibration is not None and calibration.embeddings.shape[1] != hidden:
        raise ValueError(f"the calibration embeddings have {calibration.embeddings.shape[1]} dimensions, the model {hidden}")
    precisions = [p for p in PRECISIONS if calibration is not None or p not in SCALAR_PRECISIONS]
    configure_batches(encoder, settings)
    metrics = ServerMetrics()
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm2vec-tokenize")  # HF tokenizers are not re-entrant

    def embed(items):
        return encoder.embed_items(items, batch_size=settings.batch_size, show_progress_bar=False)

    batcher = Batcher(embed, hidden, settings.max_batch_tokens, settings.max_queue_tokens, metrics, regroup_s=settings.regroup_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llm2vec-fast embedding server", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.encoder = encoder
    app.state.draining = False
    app.state.in_flight = 0
    app.add_middleware(GuardMiddleware, state=app.state)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        request.scope["llm2vec_error_type"] = err.type
        return error_response(request.url.path, err)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        """FastAPI's and Starlette's own errors (unknown route or method, a body that fails to parse
        other than as bad JSON, e.g. nesting too deep) in this server's documented error shape."""
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        request.scope["llm2vec_error_type"] = kind
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
        return error_response(request.url.path, ServeError(err.status_code, str(err.detail), kind, code=code, headers=err.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        request.scope["llm2vec_error_type"] = "invalid_request_error"
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            detail = first.get("ctx", {}).get("error", "")
            message = f"the request body is not valid JSON{f' ({detail})' if detail else ''}"
            return error_response(request.url.path, ServeError(422, message, param=None, code="invalid_json"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if loc and not message.startswith("'"):
            message = f"{'.'.join(loc)}: {message}"
        return error_response(request.url.path, ServeError(422, message, param=".".join(loc) or None, code="invalid_value"))

    def check_dimensions(dimensions: int | None, param: str = "dimensions") -> None:
        if dimensions is not None and dimensions > hidden:
            raise ServeError(
                400,
                f"{param}={dimensions} is out of range: this model's embeddings have {hidden} dimensions",
                param=param,
                code="invalid_value",
            )

    def check_precision(precision: str) -> None:
        if precision in SCALAR_PRECISIONS and calibration is None:
            raise ServeError(
                400,
                f"precision={precision!r} needs per-dimension ranges, and this server has no calibration "
                "set: start it with --calibration FILE (texts, one per line), or ask for float32, "
                "float16, binary or ubinary",
                param="precision",
                code="calibration_missing",
            )

    async def embed_pairs(request: Request, pairs: list[tuple[str, str]], truncate: bool, field: str) -> tuple[torch.Tensor, int]:
        """Embeddings of ``pairs`` in order and their real token count."""
        if len(pairs) > settings.max_client_batch_size:
            raise ServeError(
                413,
                f"'{field}' has {len(pairs)} texts; this server takes at most "
                f"{settings.max_client_batch_size} per request (--max-client-batch-size)",
                param=field,
                code="too_many_inputs",
            )
        loop = asyncio.get_running_loop()
        items, too_long = await loop.run_in_executor(tokenizer_thread, tokenize_pairs, encoder, pairs, truncate)
        if too_long:
            shown = "; ".join(field + p for p in too_long[:5]) + ("; ..." if len(too_long) > 5 else "")
            raise ServeError(
                413,
                f"{len(too_long)} input(s) too long ({shown}): this model embeds at most "
                f"{encoder.doc_max_length} text tokens and {encoder.max_length} tokens with the "
                "instruction; shorten them or send truncate=true",
                param=field,
                code="input_too_long",
            )
        tokens = sum(len(x.input_ids) for x in items)
        if tokens > settings.max_queue_tokens:
            raise ServeError(
                413,
                f"the request has {tokens} tokens; this server queues at most {settings.max_queue_tokens} (--max-queue-tokens): split it",
                param=field,
                code="request_too_large",
            )
        try:
            job = batcher.submit(items)
        except QueueFull as err:
            raise ServeError(429, str(err), "rate_limit_error", code="queue_full", headers={"Retry-After": str(err.retry_after)}) from err
        except BatcherStopped as err:
            raise ServeError(503, str(err), "server_unavailable", headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)}) from err
        disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({job.future, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                raise ClientGone()
            err = job.future.exception()
            if isinstance(err, BatcherStopped):
                raise ServeError(503, str(err), "server_unavailable", headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})
            if err is not None:
                raise ServeError(
                    500, f"the model failed on this request's batch: {type(err).__name__}: {err}", "server_error", code="model_error"
                )
            return job.future.result(), tokens
        finally:
            disconnect.cancel()
            if not job.future.done():
                batcher.cancel(job)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, err: ClientGone):
        request.scope["llm2vec_error_type"] = "client_closed_request"
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(request.url.path, ServeError(500, f"internal error: {type(err).__name__}", "server_error"))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=error_responses(OpenAIError))
    async def openai_embeddings(body: EmbeddingRequest, request: Request):
        """OpenAI embeddings. Vectors are L2-normalised (after ``dimensions`` truncation), as OpenAI's."""
        if body.model not in (None, "", settings.model_name, *settings.model_aliases):
            raise ServeError(
                400,
                f"model {body.model!r} is not served here; this server serves {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        check_dimensions(body.dimensions)
        check_precision(body.precision)
        emb, tokens = await embed_pairs(request, body.pairs(), body.truncate, "input")
        content = await off_loop_if_large(
            emb,
            lambda: openai_body(
                postprocess(emb, body.dimensions, True, body.precision, calibration),
                body.encoding_format,
                settings.model_name,
                tokens,
                body.precision,
            ),
        )
        return Response(content, media_type="application/json")

    @app.post("/embed", response_model=list[list[float]], responses=error_responses(TEIError))
    async def tei_embed(body: EmbedRequest, request: Request):
        """text-embeddings-inference ``/embed``: a list of vectors."""
        check_dimensions(body.dimensions)
        check_precision(body.precision)
        emb, _ = await embed_pairs(request, body.pairs(), body.truncate, "inputs")
        content = await off_loop_if_large(
            emb, lambda: tei_body(postprocess(emb, body.dimensions, body.normalize, body.precision, calibration))
        )
        return Response(content, media_type="application/json")

    @app.get("/health", responses=error_responses(TEIError, GUARD_STATUSES))
    async def health():
        return {"status": "ok"}

    @app.get("/info", response_model=Info, responses=error_responses(TEIError, GUARD_STATUSES))
    async def info():
        return Info(
            model=settings.model_name,
            model_path=settings.model_path,
            dimensions=hidden,
            pooling=encoder.pooling_mode,
            max_length=encoder.max_length,
            doc_max_length=encoder.doc_max_length,
            backend=backend_of(encoder),
            device=str(encoder.device),
            packed=bool(getattr(encoder, "use_packed", False)),
            max_batch_tokens=settings.max_batch_tokens,
            max_client_batch_size=settings.max_client_batch_size,
            max_queue_tokens=settings.max_queue_tokens,
            max_concurrent_requests=settings.max_concurrent_requests,
            precisions=precisions,
            calibration_size=None if calibration is None else len(calibration),
            auth=settings.api_key is not None,
            version=__version__,
        )

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(OpenAIError, GUARD_STATUSES))
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_name)])

    @app.get("/metrics", response_class=PlainTextResponse, responses=error_responses(TEIError, (401,)))
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
