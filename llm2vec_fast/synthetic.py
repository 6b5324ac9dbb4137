"""Synthetic encode workloads: random-weight encoders with real model shapes and random token batches.

Used by ``benchmarks/bench_encode.py`` and ``llm2vec-fast profile --random-shapes``: they need
Llama-3-8B / Llama-3.2-1B *shapes* (speed depends on shapes, not on weights) on machines with no
checkpoint and no tokenizer. Token lengths follow the "realistic mix" of the benchmarks:
lognormal with median 96, clipped to ``[8, 512]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .prompting import EncodingInput

_LLAMA3_VOCAB = 128256

#: LlamaConfig keyword arguments of each random shape.
RANDOM_SHAPES: dict[str, dict] = {
    "llama-8b": dict(  # Meta-Llama-3-8B
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=_LLAMA3_VOCAB,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "llama-1b": dict(  # Llama-3.2-1B
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=_LLAMA3_VOCAB,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(  # SmolLM2-135M (the default model): small enough to be launch-bound on a GPU
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(  # seconds on a CPU; head_dim 32 is a Triton-supported head size
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=1024,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}

INIT_STD = 0.02


class NoTokenizer:
    """Stands in for the tokenizer of a random-weight encoder: it has a pad id and nothing else."""

    pad_token_id = 0
    eos_token = None

    def __call__(self, *args, **kwargs):
        raise TypeError("a random-weight encoder has no tokenizer: pass token ids to embed_items() instead of texts")


def random_config(shape: str):
    """A ``LlamaConfig`` with the sizes of ``shape`` (a key of :data:`RANDOM_SHAPES`) and SDPA attention."""
    from transformers import LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; expected one of {tuple(RANDOM_SHAPES)}")
    config = LlamaConfig(**RANDOM_SHAPES[shape], initializer_range=INIT_STD, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def random_model(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A bidirectional random-weight decoder (``AutoModel``) built directly on ``device`` in ``dtype``
    (no host copy of the weights). Matrices are drawn N(0, 0.02) and norms set to 1, so a 32-layer
    bf16 forward stays finite."""
    from transformers import AutoModel

    from .bidirectional import enable_bidirectional

    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModel.from_config(random_config(shape), dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    for param in model.parameters():  # same draw whatever transformers' own init did
        if param.dim() >= 2:
            param.normal_(0.0, INIT_STD, generator=gen)
        else:
            param.fill_(1.0)
    return enable_bidirectional(model.eval())


def random_encoder(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **settings):
    """:class:`~llm2vec_fast.LLM2Vec` around :func:`random_model`; ``settings`` go to its constructor
    (``pooling_mode``, ``packed``, ``max_tokens_per_batch``, ...). Encode with ``embed_items``."""
    from .encoder import LLM2Vec

    return LLM2Vec(random_model(shape, device, dtype, seed), NoTokenizer(), **settings).eval()


def _lognormal_draws(median: float, lo: int, hi: int, seed: int):
    """Endless lognormal(median, sigma=0.8) integer draws clipped to ``[lo, hi]``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        draw = torch.empty(256).log_normal_(math.log(median), 0.8, generator=gen)
        yield from draw.clamp(lo, hi).round().int().tolist()


def lognormal_lengths(total_tokens: int, median: float, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Sequence lengths drawn lognormal(median, sigma=0.8), clipped to ``[lo, hi]``, until ``total_tokens``."""
    lengths: list[int] = []
    total = 0
    for x in _lognormal_draws(median, lo, hi, seed):
        if total >= total_tokens:
            break
        lengths.append(x)
        total += x
    return lengths


def sample_lengths(count: int, median: float = 96, lo: int = 8, hi: int = 512, seed: int = 0) -> list[int]:
    """``count`` lengths of the same lognormal mix as :func:`lognormal_lengths`."""
    draws = _lognormal_draws(median, lo, hi, seed)
    return [next(draws) for _ in range(count)]


def random_items(lengths: Sequence[int], vocab_size: int, seed: int = 0) -> list[EncodingInput]:
    """One :class:`EncodingInput` of random token ids per length, every token pooled."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (sum(lengths),), generator=gen).tolist()  # skip pad/bos/eos ids
    items, start = [], 0
    for n in lengths:
        items.append(EncodingInput(ids[start : start + n], n))
        start += n
    return items
