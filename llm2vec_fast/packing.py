"""Padding-free packed batches: many sequences concatenated into one row, described by
``cu_seqlens`` (flash-attention's varlen layout), grouped under a token budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kernels._dispatch import check_cu_seqlens
from .prompting import EncodingInput

DEFAULT_MAX_TOKENS_PER_BATCH = 16384


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices, longest first, so each group's total length stays within ``max_tokens``
    (a single longer sequence gets a group of its own)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def pack(items: Sequence[EncodingInput], device: torch.device | str = "cpu") -> dict[str, torch.Tensor | int]:
    """Concatenate ``items`` into ``input_ids``/``position_ids`` ``[1, T]`` (positions restart at 0
    for every sequence, so RoPE matches the unpacked model), ``cu_seqlens`` int32 ``[B+1]``,
    ``max_seqlen`` and the ``pool_mask`` ``[T]`` of tokens to pool.

    ``cu_seqlens`` is validated here, once, on the host (before it moves to ``device``): the kernels
    then take it and ``max_seqlen`` as given, without reading it back from the GPU in every layer."""
    if not items:
        raise ValueError("pack needs at least one sequence")
    lengths = torch.tensor([len(x.input_ids) for x in items], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(items) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    total = int(cu_seqlens[-1])
    check_cu_seqlens(cu_seqlens, total)  # int32 overflow of a huge batch would show up here
    input_ids = torch.tensor([t for x in items for t in x.input_ids], dtype=torch.long)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long())
    position_ids = torch.arange(total) - starts
    seq_len = torch.repeat_interleave(lengths.long(), lengths.long())
    num_pooled = torch.repeat_interleave(torch.tensor([x.num_pooled for x in items]), lengths.long())
    pool_mask = position_ids >= seq_len - num_pooled
    return dict(
        input_ids=input_ids[None].to(device),
        position_ids=position_ids[None].to(device),
        cu_seqlens=cu_seqlens.to(device),
        max_seqlen=int(lengths.max()),
        pool_mask=pool_mask.to(device),
    )
