"""CUDA graphs of the packed forward in token-count buckets (small models: launch-bound).

A small encoder spends most of a packed batch's time launching kernels (a few hundred per forward).
A CUDA graph replays them all with one launch, but only for the shapes it was captured with, so the
packed batch is padded to a fixed shape first:

* its token count ``T`` rounds up to a bucket (:func:`power_of_two_buckets` or a list you give);
* the padding tokens form dummy sequences of at most ``max_seqlen`` tokens each (``max_seqlen``
  itself rounded up to a power of two; never longer than the model's ``max_position_embeddings``,
  as position-dependent rotary scalings such as dynamic RoPE look at the batch's largest position),
  then empty sequences up to a power-of-two sequence count.

Attention never crosses a sequence boundary and every other layer works per token, so the dummy
sequences cannot change a real sequence's output; their pooled rows are dropped (no pooled tokens:
zeros). :class:`PackedCudaGraphs` captures one graph per :class:`GraphKey` (the padded shape) on the
first batch of that shape and replays it after; batches larger than the largest bucket, or arriving
when ``max_graphs`` are held, run eagerly. On a CPU it runs the same padded batch eagerly (that is how
the tests check the padding; graphs need CUDA).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kernels._dispatch import next_power_of_2

logger = logging.getLogger(__name__)

#: Smallest default bucket: below it a batch is all launch overhead anyway.
MIN_BUCKET_TOKENS = 64
#: Graphs held at most (each keeps its activations' memory in the shared pool).
DEFAULT_MAX_GRAPHS = 32


def power_of_two_buckets(max_tokens: int, min_tokens: int = MIN_BUCKET_TOKENS) -> tuple[int, ...]:
    """Powers of two from ``min_tokens`` (rounded up) to the first one >= ``max_tokens``."""
    if max_tokens < 1 or min_tokens < 1:
        raise ValueError(f"bucket sizes must be positive, got max_tokens={max_tokens}, min_tokens={min_tokens}")
    buckets = [next_power_of_2(min_tokens)]
    while buckets[-1] < max_tokens:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """``buckets`` sorted, after checking they are positive integers without repeats."""
    values = sorted(int(b) for b in buckets)
    if not values or values[0] < 1 or len(set(values)) != len(values):
        raise ValueError(f"token buckets must be distinct positive integers, got {list(buckets)}")
    return tuple(values)


def bucket_for(n_tokens: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``n_tokens`` (``buckets`` sorted), ``None`` if none does."""
    for bucket in buckets:
        if n_tokens <= bucket:
            return bucket
    return None


@dataclass(frozen=True)
class GraphKey:
    """The padded shape of a packed batch: one graph each."""

    tokens: int
    sequences: int
    max_seqlen: int


def dummy_length(max_seqlen: int, max_positions: int | None) -> int:
    """The longest dummy sequence: ``max_seqlen``, capped at the model's position table."""
    return max_seqlen if max_positions is None else max(1, min(max_seqlen, int(max_positions)))


def graph_key(
    n_tokens: int, n_sequences: int, max_seqlen: int, buckets: Sequence[int], max_positions: int | None = None
) -> GraphKey | None:
    """The padded shape for a packed batch of ``n_tokens`` in ``n_sequences`` sequences, the longest
    ``max_seqlen``, for a model of ``max_positions`` positions; ``None`` when ``n_tokens`` exceeds the
    largest bucket."""
    tokens = bucket_for(n_tokens, buckets)
    if tokens is None:
        return None
    longest = min(next_power_of_2(max(1, max_seqlen)), tokens)
    dummies = math.ceil((tokens - n_tokens) / dummy_length(longest, max_positions))
    return GraphKey(tokens, next_power_of_2(n_sequences + dummies), longest)


def pad_packed_batch(features: dict, key: GraphKey, pad_token_id: int, max_positions: int | None = None) -> dict:
    """``features`` (:func:`llm2vec_fast.packing.pack`) padded to ``key``'s shape: dummy sequences of
    ``pad_token_id`` (at most ``key.max_seqlen`` and ``max_positions`` tokens each, positions from 0,
    nothing pooled), then empty sequences. The real sequences keep their rows and indices. Reads
    nothing back from the device: the new offsets are known on the host."""
    input_ids, cu_seqlens = features["input_ids"], features["cu_seqlens"]
    n_tokens, n_sequences = input_ids.shape[1], cu_seqlens.shape[0] - 1
    padding = key.tokens - n_tokens
    longest = dummy_length(key.max_seqlen, max_positions)
    lengths = [longest] * (padding // longest) + ([padding % longest] if padding % longest else [])
    if padding < 0 or n_sequences + len(lengths) > key.sequences or features["max_seqlen"] > key.max_seqlen:
        raise ValueError(f"a batch of {n_tokens} tokens, {n_sequences} sequences does not fit {key}")
    lengths += [0] * (key.sequences - n_sequences - len(lengths))
    device = input_ids.device
    offsets = torch.tensor(lengths, dtype=torch.int64).cumsum(0) + n_tokens
    positions = torch.cat([torch.arange(n) for n in lengths if n]) if padding else torch.zeros(0, dtype=torch.long)
    return dict(
        input_ids=torch.cat([input_ids, torch.full((1, padding), pad_token_id, dtype=input_ids.dtype, device=device)], dim=1),
        position_ids=torch.cat([features["position_ids"], positions.to(features["position_ids"].dtype).to(device)[None]], dim=1),
        cu_seqlens=torch.cat([cu_seqlens, offsets.to(cu_seqlens.dtype).to(device)]),
        max_seqlen=key.max_seqlen,
        pool_mask=torch.cat([features["pool_mask"], torch.zeros(padding, dtype=features["pool_mask"].dtype, device=device)]),
    )


class PackedCudaGraphs:
    """Runs ``encoder.forward_packed`` through CUDA graphs captured per padded shape.

    Args:
        encoder: an :class:`~llm2vec_fast.LLM2Vec` on the packed path.
        buckets: token-count buckets (default: powers of two up to ``encoder.max_tokens_per_batch``).
        max_graphs: graphs held at most; other shapes run eagerly once this many are captured.
    """

    def __init__(self, encoder, buckets: Sequence[int] | None = None, max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.encoder = encoder
        self.buckets = check_buckets(buckets) if buckets is not None else power_of_two_buckets(encoder.max_tokens_per_batch)
        self.max_graphs = int(max_graphs)
        self.pad_token_id = int(encoder.tokenizer.pad_token_id)
        self.max_positions = getattr(getattr(encoder.model, "config", None), "max_position_embeddings", None)
        self._graphs: dict[GraphKey, tuple] = {}
        self._pool = None
        self._lock = threading.Lock()  # one capture / replay at a time: the static buffers are shared

    @property
    def captured(self) -> tuple[GraphKey, ...]:
        return tuple(self._graphs)

    def __call__(self, features: dict) -> torch.Tensor:
        """Embeddings ``[B, hidden]`` of the packed batch ``features``."""
        n_sequences = features["cu_seqlens"].shape[0] - 1
        key = graph_key(features["input_ids"].shape[1], n_sequences, int(features["max_seqlen"]), self.buckets, self.max_positions)
        if key is None or (key not in self._graphs and len(self._graphs) >= self.max_graphs):
            return self.encoder.forward_packed(features)
        padded = pad_packed_batch(features, key, self.pad_token_id, self.max_positions)
        if padded["input_ids"].device.type != "cuda":
            return self.encoder.forward_packed(padded)[:n_sequences]
        with self._lock:
            if key not in self._graphs:
                try:
                    self._graphs[key] = self._capture(padded)
                except RuntimeError as err:  # e.g. an op that syncs with the host cannot be captured
                    logger.warning("CUDA graph capture failed (%s); packed batches run eagerly from now on", err)
                    self.max_graphs = len(self._graphs)
                    return self.encoder.forward_packed(features)
            graph, static, out = self._graphs[key]
            for name in ("input_ids", "position_ids", "cu_seqlens", "pool_mask"):
                static[name].copy_(padded[name])
            graph.replay()
            return out[:n_sequences].clone()

    def _capture(self, padded: dict) -> tuple:
        static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in padded.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles and autotunes every kernel before the capture
            for _ in range(2):
                self.encoder.forward_packed(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.encoder.forward_packed(static)
        self._pool = graph.pool()
        return graph, static, out
