"""``llm2vec-fast serve``: an OpenAI-compatible embedding server with token-budget dynamic batching."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_model_options, load_encoder

API_KEY_ENV = "LLM2VEC_FAST_API_KEY"


def add_parser(sub) -> None:
    from ..packing import DEFAULT_MAX_TOKENS_PER_BATCH

    p = sub.add_parser(
        "serve",
        help="serve embeddings over HTTP (OpenAI /v1/embeddings, TEI /embed)",
        description="Serve an encoder over HTTP: OpenAI-compatible POST /v1/embeddings, TEI-style POST /embed, "
        "GET /health, /info, /v1/models and Prometheus /metrics. Requests of concurrent clients are merged into "
        "batches of up to --max-batch-tokens tokens. SIGTERM drains: in-flight requests finish, new ones get 503.",
    )
    add_model_options(p)
    p.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="DIR",
        help="serve an exported ONNX folder with ONNX Runtime instead of a torch model (--device cuda needs onnxruntime-gpu)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the 'model' clients may send; answers and /v1/models carry the first (default: the model's id, also "
        "accepting the --model / --onnx argument as given and its folder name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS_PER_BATCH,
        help=f"real tokens per model batch (default {DEFAULT_MAX_TOKENS_PER_BATCH})",
    )
    p.add_argument("--max-client-batch-size", type=int, default=256, help="texts per request at most (default 256)")
    p.add_argument(
        "--max-queue-tokens",
        type=int,
        default=None,
        help="tokens waiting for the model at most; more gets 429 with Retry-After (default 8 x --max-batch-tokens)",
    )
    p.add_argument(
        "--regroup-ms",
        type=float,
        default=50.0,  # serve.batcher.DEFAULT_REGROUP_MS (not imported here: the serve extra may be missing)
        help="after a batch, wait up to this long (and at most a quarter of the batch's time) for the clients just "
        "answered to send their next request, so concurrent clients share one batch (default %(default)s; 0 disables)",
    )
    p.add_argument("--max-concurrent-requests", type=int, default=512, help="requests handled at once; more gets 429 (default 512)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 2**20, help="request body size limit (default 32 MiB)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="texts per padded forward pass (ONNX Runtime, causal models, --no-packed; the packed path batches by tokens)",
    )
    p.add_argument(
        "--no-packed",
        action="store_true",
        help="pad each batch (length-sorted, --batch-size texts per forward) even where the padding-free packed "
        "path runs (by default every bidirectional torch model, on CPU too)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="FILE",
        help="texts (one per line; 100+ recommended) embedded at start: their per-dimension ranges set the "
        "buckets of precision=int8/uint8 requests (without it those are refused)",
    )
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV} if set)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM (default 30)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run)


def load_serving_encoder(args: argparse.Namespace):
    """The torch ``LLM2Vec`` from the model options, or an ``OnnxEncoder`` with ``--onnx``."""
    if args.onnx is None:
        return load_encoder(args)
    given = [
        name
        for name, value in (
            ("--model", args.model),
            ("--peft", args.peft),
            ("--pooling", args.pooling),
            ("--max-length", args.max_length),
            ("--doc-max-length", args.doc_max_length),
            ("--dtype", args.dtype),
            ("--quantization", args.quantization),
            ("--fused", args.fused),
        )
        if value
    ]
    if given or args.no_bidirectional:
        given += ["--no-bidirectional"] if args.no_bidirectional else []
        raise ValueError(f"{', '.join(given)} cannot be combined with --onnx: the ONNX folder fixes the model and its settings")
    from ..export import OnnxEncoder

    device = (args.device or "cpu").split(":")[0]
    return OnnxEncoder.from_pretrained(args.onnx, providers=device)


def served_model_names(args: argparse.Namespace, encoder) -> tuple[str, tuple[str, ...]]:
    """``(name, aliases)``: the name answers carry and the other names a request may send. Without
    ``--served-model-name``: the model's id (a hub-style ``org/name`` recorded by ``save()``), else the
    folder's name; the ``--model`` / ``--onnx`` argument as given and its folder name are accepted too,
    so a client may send either what it started the server with or what the server reports."""
    if args.served_model_name:
        name = args.served_model_name[0]
        return name, tuple(a for a in dict.fromkeys(args.served_model_name[1:]) if a != name)
    source = args.onnx or args.model
    folder = Path(source).expanduser().resolve().name if source else None
    model_id = getattr(encoder, "model_id", None)
    if model_id and not os.path.exists(os.path.expanduser(model_id)):
        name = model_id
    else:
        name = folder or "default"
    aliases = [str(source), folder] if source else []
    return name, tuple(a for a in dict.fromkeys(aliases) if a and a != name)


def load_calibration(encoder, path: Path, batch_size: int):
    """The int8/uint8 calibration set of ``serve --calibration``: the texts' float embeddings
    (full dimension, not normalised; the server truncates and normalises them as each request asks)."""
    from ..quantization import CalibrationSet
    from .encode import read_lines

    texts = read_lines(path)
    if len(texts) < 2:
        raise ValueError(f"--calibration {str(path)!r} needs at least two texts")
    floats = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=len(texts) > 1000)
    print(f"int8/uint8 ranges from {len(texts)} calibration texts in {path}", file=sys.stderr, flush=True)
    return CalibrationSet(floats, source=str(path))


def run(args: argparse.Namespace) -> int:
    from ..serve import ServeSettings, create_app, run_server

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.calibration is not None and not args.calibration.is_file():
        raise FileNotFoundError(f"--calibration file {str(args.calibration)!r} does not exist")
    encoder = load_serving_encoder(args)
    calibration = load_calibration(encoder, args.calibration, args.batch_size) if args.calibration else None
    name, aliases = served_model_names(args, encoder)
    settings = ServeSettings(
        model_name=name,
        model_aliases=aliases,
        model_path=str(args.onnx or getattr(encoder, "path", None) or args.model or "default"),
        max_batch_tokens=args.max_batch_tokens,
        max_client_batch_size=args.max_client_batch_size,
        max_queue_tokens=args.max_queue_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_bytes=args.max_request_bytes,
        batch_size=args.batch_size,
        packed=False if args.no_packed else None,
        regroup_ms=args.regroup_ms,
        api_key=api_key,
    )
    app = create_app(encoder, settings, calibration)
    encoder.embed_items(encoder.tokenize(["warm-up"]), show_progress_bar=False)  # first request is not slow
    print(
        f"llm2vec-fast serve: {settings.model_name} ({'onnxruntime' if args.onnx else 'torch'}, {encoder.device}, "
        f"{encoder.hidden_size} dimensions) on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    run_server(app, args.host, args.port, args.log_level, args.graceful_timeout)
    return 0
