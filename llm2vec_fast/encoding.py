"""The ``encode()`` contract shared by the torch encoder (``LLM2Vec``) and the ONNX Runtime
encoder: input validation, official tokenisation, length sorting, batching, output types."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .prompting import EncodingInput, normalize_inputs, prepare_inputs
from .quantization import SCALAR_PRECISIONS, check_precision, check_truncate_dim, quantize_embeddings, truncate_and_normalize

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
# encoder pooling mode -> kernels.masked_pool mode
KERNEL_POOLING_MODE = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "last", "last_token": "last", "bos_token": "first"}
CONFIG_KEYS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
# the official llm2vec's inference limits: tokens per input, and text tokens kept by dropping words
DEFAULT_MAX_LENGTH, DEFAULT_DOC_MAX_LENGTH = 512, 400
PROGRESS_BAR_MIN_BATCHES = 10


def check_encoder_settings(pooling_mode: str, max_length: int, doc_max_length: int) -> None:
    if pooling_mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling_mode {pooling_mode!r}; expected one of {POOLING_MODES}")
    if int(max_length) < 1 or int(doc_max_length) < 1:
        raise ValueError("max_length and doc_max_length must be positive")


class EncodeMixin:
    """Implements ``tokenize`` and ``encode`` on top of ``_embed_batch(items) -> [B, hidden] tensor``.

    Subclasses set ``tokenizer``, ``pooling_mode``, ``max_length``, ``doc_max_length``,
    ``skip_instruction``, ``model_id`` and ``hidden_size``.
    """

    _warned_truncation = False

    def tokenize(self, sentences) -> list[EncodingInput]:
        """Token ids and pooled-span length of each input, as the official library computes them."""
        pairs, _ = normalize_inputs(sentences)
        return self._prepare(pairs)

    def _prepare(self, pairs: list[tuple[str, str]]) -> list[EncodingInput]:
        items = prepare_inputs(
            self.tokenizer,
            pairs,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
            skip_instruction=self.skip_instruction,
            model_id=self.model_id,
            append_eos=self.pooling_mode == "eos_token",
        )
        if not self._warned_truncation and any(x.truncated for x in items):
            self._warned_truncation = True
            logger.warning(
                "Some inputs were truncated: texts over doc_max_length=%d tokens lose their last words (as in the "
                "official llm2vec), and a whole input (instruction included) is cut at max_length=%d tokens.",
                self.doc_max_length,
                self.max_length,
            )
        return items

    def padded_batch(self, items: Sequence[EncodingInput]) -> dict[str, np.ndarray]:
        """Right-padded numpy batch: ``input_ids``, ``attention_mask``, ``position_ids`` and the
        ``pool_mask`` of the tokens to pool."""
        batch, length = len(items), max(len(x.input_ids) for x in items)
        input_ids = np.full((batch, length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch, length), dtype=np.int64)
        pool_mask = np.zeros((batch, length), dtype=bool)
        for i, item in enumerate(items):
            n = len(item.input_ids)
            input_ids[i, :n] = item.input_ids
            attention_mask[i, :n] = 1
            pool_mask[i, n - item.num_pooled : n] = True
        position_ids = np.maximum(attention_mask.cumsum(1) - 1, 0)
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, pool_mask=pool_mask)

    def _embed_batch(self, items: Sequence[EncodingInput]) -> torch.Tensor:
        raise NotImplementedError

    def _before_encode(self, device) -> None:
        """Hook run once per ``encode`` call (e.g. move the model to ``device``)."""

    def _batches(self, items: list[EncodingInput], batch_size: int) -> list[list[int]]:
        """Indices of each batch: longest inputs first, ``batch_size`` inputs per batch."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def _pads_batches(self) -> bool:
        """Whether a batch is right-padded to its longest input (``False`` for padding-free packing)."""
        return True

    def forward_lengths(self, items: Sequence[EncodingInput], batch_size: int = 32) -> np.ndarray:
        """Tokens each input occupies in its forward pass under :meth:`embed_items`' batching: the
        length of its batch's longest input when batches are padded, its own length when packed.
        Their sum is the work the model does (load-independent, unlike a timing)."""
        items = list(items)
        lengths = np.array([len(x.input_ids) for x in items], dtype=np.int64)
        if not self._pads_batches():
            return lengths
        out = np.empty_like(lengths)
        for idx in self._batches(items, batch_size):
            out[idx] = lengths[idx].max()
        return out

    def embed_items(self, items: Sequence[EncodingInput], batch_size: int = 32, show_progress_bar: bool | None = None) -> torch.Tensor:
        """float32 ``[N, hidden]`` CPU embeddings of already tokenised ``items``, in input order: what
        :meth:`encode` does after tokenisation (length-sorted batches, forward passes, copy back).
        Benchmarks and the profiler call it with synthetic token ids."""
        items = list(items)
        batches = self._batches(items, batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(batches) > PROGRESS_BAR_MIN_BATCHES
        out = torch.empty(len(items), self.hidden_size, dtype=torch.float32)
        for idx in tqdm(batches, desc="Encoding", unit="batch", disable=not show_progress_bar):
            out[idx] = self._embed_batch([items[i] for i in idx]).float().cpu()
        return out

    def encode(
        self,
        sentences: str | Sequence[str] | Sequence[Sequence[str]],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        device: str | torch.device | None = None,
        precision: str = "float32",
        truncate_dim: int | None = None,
        quantization_ranges: np.ndarray | None = None,
        calibration_embeddings: np.ndarray | torch.Tensor | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Embed texts or ``[instruction, text]`` pairs.

        Args:
            sentences: a list of strings or of ``[instruction, text]`` pairs (a single string gives
                a 1-D result). Instruction tokens are attended to but not pooled.
            batch_size: inputs per forward pass (the packed CUDA path batches by tokens instead).
            show_progress_bar: ``None`` shows a bar only on long runs.
            convert_to_numpy: return a numpy array; ``convert_to_tensor=True`` wins if both are set.
            normalize_embeddings: L2-normalise each embedding.
            device: run on this device (moves the model).
            precision: ``float32``, ``float16``, ``int8``, ``uint8``, ``binary`` or ``ubinary``
                (as sentence-transformers' ``quantize_embeddings``; binary packs 8 dims per byte).
            truncate_dim: keep the first ``truncate_dim`` dimensions (Matryoshka), before normalising.
            quantization_ranges: int8/uint8 per-dimension ``[min; max]`` (``[2, dim]``), e.g. from
                :func:`llm2vec_fast.quantization.calibration_ranges`.
            calibration_embeddings: float embeddings (same ``truncate_dim`` / normalisation) whose
                ranges set the int8/uint8 buckets. Without either, the ranges come from this call's
                embeddings (logged; needs two or more inputs).

        Returns:
            Embeddings on the CPU, in input order (a tensor by default, like the official library):
            float32 unless ``precision`` says otherwise.
        """
        pairs, single = normalize_inputs(sentences)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)  # a numpy integer too
        check_precision(precision)
        check_truncate_dim(truncate_dim, self.hidden_size)
        if precision in SCALAR_PRECISIONS and quantization_ranges is None and calibration_embeddings is None and len(pairs) < 2:
            raise ValueError(f"{precision} needs quantization_ranges= or calibration_embeddings= to encode a single input")
        self._before_encode(device)
        out = self.embed_items(self._prepare(pairs), batch_size, show_progress_bar)
        out = truncate_and_normalize(out, truncate_dim, normalize_embeddings)
        if precision != "float32":
            out = torch.from_numpy(quantize_embeddings(out, precision, quantization_ranges, calibration_embeddings))
        if single:
            out = out[0]
        if convert_to_numpy and not convert_to_tensor:
            return out.numpy()
        return out
