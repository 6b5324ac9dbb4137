"""Model integration of the packed varlen attention kernel (the third layer, after the Triton
kernel and its autograd Function in ``llm2vec_fast.kernels``).

We register an attention implementation named ``llm2vec_varlen`` with transformers'
``AttentionInterface`` (plus a mask function that builds no mask). A packed forward passes
``cu_seq_lens_q`` / ``max_length_q`` through the model's kwargs, as transformers does for
flash-attention varlen; every attention layer then calls :func:`flash_attn_varlen` on the
``[T, H, D]`` views of its q, k, v. Calls without packing metadata fall back to SDPA.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from .kernels import flash_attn_varlen

ATTN_IMPLEMENTATION = "llm2vec_varlen"
_state = {"backend": "auto", "registered": False}


@contextlib.contextmanager
def kernel_backend(backend: str) -> Iterator[None]:
    """Run the packed path's kernels (attention and pooling) with ``backend`` (``auto``, ``triton``
    or ``torch``) inside the block.

    Tests use ``triton`` on CPU under ``TRITON_INTERPRET=1``; the library itself keeps ``auto``.
    """
    previous, _state["backend"] = _state["backend"], backend
    try:
        yield
    finally:
        _state["backend"] = previous


def current_backend() -> str:
    """The kernel backend selected by :func:`kernel_backend` (``auto`` by default)."""
    return _state["backend"]


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``[1, Hq, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]``
    -> ``[1, T, Hq, D]``.

    ``softcap`` (sent by Gemma2's attention as ``attn_logit_softcapping``, ``None`` for other
    families) caps the logits inside the kernel; ``dropout`` (the module's ``attention_dropout`` in
    training, 0 in eval) is the kernel's attention dropout (Philox mask in the Triton kernels,
    ``torch.rand`` masks on the torch backend)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    softcap = kwargs.get("softcap") or 0.0
    if cu_seqlens is None:
        if softcap:  # SDPA cannot cap logits: use the model's own eager attention (Gemma2 defines one)
            eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            if eager is None:
                raise NotImplementedError(f"{type(module).__name__}: soft-capped attention without packing metadata")
            return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects batch size 1 ([1, H, T, D]), got {tuple(query.shape)}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = flash_attn_varlen(
        q,
        k,
        v,
        cu_seqlens.to(torch.int32),
        int(kwargs.get("max_length_q") or 0) or int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        softmax_scale=scaling,
        dropout_p=float(dropout),
        softcap=softcap,
        backend=_state["backend"],
    )
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    return None


def register() -> str:
    """Register ``llm2vec_varlen`` with transformers (idempotent); returns the name."""
    if not _state["registered"]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
        _state["registered"] = True
    return ATTN_IMPLEMENTATION


def packed_hidden_states(net: nn.Module, model: nn.Module, features: dict) -> torch.Tensor:
    """Last hidden states ``[T, D]`` of a packed batch (:func:`llm2vec_fast.packing.pack`) run
    through ``net`` (``model`` itself, or a peft / DDP wrapper of it) with the varlen attention
    switched on for ``model``'s decoder. ``model`` must be bidirectional."""
    from .bidirectional import decoder_of, is_bidirectional

    if not is_bidirectional(model):
        raise ValueError("the packed path needs a bidirectional model (enable_bidirectional=True)")
    cu_seqlens, max_seqlen = features["cu_seqlens"], features["max_seqlen"]
    with packed_attention(decoder_of(model)):
        out = net(
            input_ids=features["input_ids"],
            position_ids=features["position_ids"],
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
        )
    return out.last_hidden_state[0]


@contextlib.contextmanager
def packed_attention(decoder: nn.Module) -> Iterator[None]:
    """Switch ``decoder`` (and its sub-configs) to the varlen attention inside the block."""
    register()
    config = decoder.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous
