"""Request and response bodies of the embedding server (pydantic).

``/v1/embeddings`` follows the OpenAI embeddings API, with extensions: ``instruction`` (applied
to every text) and ``[instruction, text]`` pairs inside ``input``, ``truncate``, and ``precision``.
``/embed`` follows text-embeddings-inference, plus ``precision``. Validation messages name the
offending field, so a client sees what to fix.

``precision`` (default ``float32``) is that of ``encode(precision=...)``: ``float16``, ``int8`` /
``uint8`` (per-dimension buckets from the server's calibration set, ``--calibration``), ``binary`` /
``ubinary`` (sign bits, 8 dimensions per byte). JSON carries numbers (integers for the integer
precisions); OpenAI's ``encoding_format="base64"`` carries the row's bytes in the dtype of
:data:`llm2vec_fast.quantization.PRECISION_DTYPES` (little-endian ``<f4`` / ``<f2``, ``i1``, ``u1``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from ..quantization import PRECISIONS

EncodingFormat = Literal["float", "base64"]
Precision = Literal[PRECISIONS]
# What ``parse_texts`` accepts, for /openapi.json; validation stays in ``parse_texts`` (its messages
# say what to fix, e.g. that token ids are not taken, which pydantic's union errors would not)
_TEXT_OR_PAIR = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}]}
Texts = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_OR_PAIR, "minItems": 1}]})]


def parse_texts(value: Any, field: str) -> list[tuple[str, str]]:
    """``(instruction, text)`` pairs of a string, a list of strings, or a list of ``[instruction,
    text]`` pairs; ``ValueError`` with a clear message for anything else.

    Empty strings are allowed: the encoder embeds them as documented (pooling over the special
    tokens), exactly as ``LLM2Vec.encode([""])``."""
    if isinstance(value, str):
        return [("", value)]
    if not isinstance(value, list):
        raise ValueError(f"'{field}' must be a string or a list of strings, got {type(value).__name__}")
    if not value:
        raise ValueError(f"'{field}' is an empty list; send at least one text")
    pairs = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            pairs.append(("", item))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            pairs.append((item[0], item[1]))
        elif isinstance(item, int) and not isinstance(item, bool):
            raise ValueError(f"'{field}' holds token ids ({field}[{i}] = {item}); this server embeds text only, send strings")
        else:
            raise ValueError(f"{field}[{i}] must be a string or an [instruction, text] pair of strings, got {type(item).__name__}")
    return pairs


class _Request(BaseModel):
    # strict: JSON types as the schema says (no true -> 1 for dimensions, no "yes" -> True for truncate)
    model_config = ConfigDict(extra="ignore", strict=True)
    texts_field: ClassVar[str]  # the field that holds the texts

    instruction: str | None = Field(None, description="instruction for every text: attended to, not pooled")
    truncate: bool = Field(False, description="cut over-long texts instead of answering 413")
    precision: Precision = Field("float32", description="output precision, as encode(precision=...); int8/uint8 need --calibration")

    @model_validator(mode="after")
    def _check_texts(self):
        parse_texts(getattr(self, self.texts_field), self.texts_field)
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """``(instruction, text)`` pairs; ``instruction`` applies to the texts that carry none of their own."""
        pairs = parse_texts(getattr(self, self.texts_field), self.texts_field)
        if not self.instruction:
            return pairs
        return [(ins or self.instruction, text) for ins, text in pairs]


class EmbeddingRequest(_Request):
    """OpenAI ``POST /v1/embeddings`` body."""

    texts_field: ClassVar[str] = "input"
    input: Texts = Field(..., description="a string, a list of strings, or a list of [instruction, text] pairs")
    model: str | None = None
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(None, ge=1, description="keep the first N dimensions, then re-normalise")
    user: str | None = None


class EmbedRequest(_Request):
    """text-embeddings-inference ``POST /embed`` body."""

    texts_field: ClassVar[str] = "inputs"
    inputs: Texts = Field(..., description="a string or a list of strings / [instruction, text] pairs")
    normalize: bool = True
    dimensions: int | None = Field(None, ge=1)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llm2vec-fast"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Info(BaseModel):
    """``GET /info``: what is served and under which limits."""

    model: str
    model_path: str | None
    dimensions: int
    pooling: str
    max_length: int
    doc_max_length: int
    backend: Literal["torch", "onnxruntime"]
    device: str
    packed: bool
    max_batch_tokens: int
    max_client_batch_size: int
    max_queue_tokens: int
    max_concurrent_requests: int
    precisions: list[str]  # what ``precision`` accepts here (int8/uint8 only with a calibration set)
    calibration_size: int | None  # texts in the int8/uint8 calibration set
    auth: bool
    version: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """Error body of the ``/v1`` routes (what the ``openai`` client parses)."""

    error: OpenAIErrorDetail


class TEIError(BaseModel):
    """Error body of the other routes (text-embeddings-inference's)."""

    error: str
    error_type: str


#: Statuses the server may answer with an error body (4xx from the guard and validation, 500 when
#: the model fails a batch, 503 while draining); shown in ``/openapi.json``.
ERROR_STATUSES = {
    400: "bad request (unknown model, out-of-range dimensions, precision without calibration)",
    401: "missing or wrong API key",
    411: "no Content-Length",
    413: "body, request or text too large",
    422: "invalid body",
    429: "too many concurrent requests or a full queue (Retry-After)",
    500: "the model failed on this request's batch",
    503: "the server is shutting down (Retry-After)",
}
GUARD_STATUSES = (401, 503)  # what any route may answer


def error_responses(model: type[BaseModel], statuses=tuple(ERROR_STATUSES)) -> dict[int, dict]:
    """FastAPI ``responses=`` documenting ``model`` as the body of each error status."""
    return {status: {"model": model, "description": ERROR_STATUSES[status]} for status in statuses}
