"""Model integration of the packed varlen attention kernel (the third layer, after the Triton
kernel and its custom op in ``llm2vec_fast.kernels``).

We register an attention implementation named ``llm2vec_varlen`` with transformers'
``AttentionInterface`` (plus a mask function). A packed forward passes ``cu_seq_lens_q`` /
``max_length_q`` through the model's kwargs, as transformers does for flash-attention varlen; every
attention layer then calls :func:`flash_attn_varlen` on the ``[T, H, D]`` views of its q, k, v.

The choice is made per call, from the kwargs, never by switching state around a call: the first
packed forward routes the decoder's attention through ``llm2vec_varlen`` for good
(:func:`use_varlen_attention`, idempotent and locked), and calls without packing metadata go on to
the implementation the config selected before (recorded on the attention modules), with the same
masks as before. So one model object can serve packed and padded calls from several threads at once;
the kernel backend (:func:`kernel_backend`) is context-local too.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Iterator

import torch
from torch import nn

from .bidirectional import PADDED_ATTENTION_ATTRIBUTE, UnsupportedArchitectureError
from .kernels import flash_attn_varlen

ATTN_IMPLEMENTATION = "llm2vec_varlen"
_state = {"registered": False}
# context-local (per thread and per asyncio task): two threads may encode with different backends
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("llm2vec_fast_kernel_backend", default="auto")
# its per-thread mirror, read under torch.compile: dynamo cannot trace ContextVar.get, but it traces
# (and guards on) a thread-local attribute, so a compiled packed forward follows the switch too
_backend_for_compile = threading.local()


class _PackedCall:
    """Set while a packed forward runs (context-local; ``None`` otherwise): counts the attention calls
    that got the packing metadata. A model that drops the kwargs on the way to its layers (Falcon in
    transformers 5.25), or whose attention bypasses transformers' attention interface (Falcon in
    5.17), would attend over the whole packed row and mix the sequences."""

    attention_calls = 0


_packed_forward: contextvars.ContextVar[_PackedCall | None] = contextvars.ContextVar("llm2vec_fast_packed_forward", default=None)
_NO_PACKING = (
    "so packed sequences would attend to each other; use the padded path (LLM2Vec packed=False, serve --no-packed, "
    "training batch_layout: padded)"
)


@contextlib.contextmanager
def kernel_backend(backend: str) -> Iterator[None]:
    """Run the packed path's kernels (attention and pooling) with ``backend`` (``auto``, ``triton``
    or ``torch``) inside the block.

    Tests use ``triton`` on CPU under ``TRITON_INTERPRET=1``; the library itself keeps ``auto``.
    The choice is context-local (a :class:`contextvars.ContextVar`): it applies to the calling
    thread (or asyncio task) only. Code compiled with ``torch.compile`` reads a per-thread copy
    (dynamo cannot trace ``ContextVar.get``), so there it is per thread, and a switch recompiles.
    """
    from .kernels._dispatch import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    token = _backend.set(backend)
    previous = getattr(_backend_for_compile, "value", "auto")
    _backend_for_compile.value = backend
    try:
        yield
    finally:
        _backend.reset(token)
        _backend_for_compile.value = previous


def current_backend() -> str:
    """The kernel backend selected by :func:`kernel_backend` (``auto`` by default)."""
    if torch.compiler.is_compiling():
        return getattr(_backend_for_compile, "value", "auto")
    return _backend.get()


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
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    call = None if torch.compiler.is_compiling() else _packed_forward.get()
    if call is not None and cu_seqlens is not None:
        call.attention_calls += 1
    if cu_seqlens is None:
        if call is not None:
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} got no packing metadata in a packed forward: this model does not pass its "
                f"keyword arguments on to its attention layers, {_NO_PACKING}"
            )
        padded = _padded_attention_function(module, bool(kwargs.get("softcap")))
        return padded(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    max_seqlen = kwargs.get("max_length_q")
    if max_seqlen is None:  # deriving it would read cu_seqlens on the host once per layer
        raise ValueError("packed attention needs max_length_q (the longest sequence, an int) with cu_seq_lens_q")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects batch size 1 ([1, H, T, D]), got {tuple(query.shape)}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = flash_attn_varlen(
        q,
        k,
        v,
        cu_seqlens.to(torch.int32),
        int(max_seqlen),
        softmax_scale=scaling,
        dropout_p=float(dropout),
        softcap=kwargs.get("softcap") or 0.0,
        backend=current_backend(),
    )
    return out.unsqueeze(0), None


def _padded_attention_function(module: nn.Module, softcap: bool):
    """The attention function for a call without packing metadata: the implementation the config
    selected before :func:`use_varlen_attention` (``eager`` = the family's own eager attention). A
    module never routed through it falls back to SDPA, or to eager attention when its logits are
    soft-capped (SDPA cannot cap)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(module, PADDED_ATTENTION_ATTRIBUTE, None)
    if impl is None:
        impl = "eager" if softcap else "sdpa"
    if impl != "eager":
        return ALL_ATTENTION_FUNCTIONS[impl]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__}: no eager attention to fall back on without packing metadata")
    return eager


def _padding_mask_only(*args, attention_mask: torch.Tensor | None = None, kv_length: int | None = None, **kwargs):
    """Mask function of ``llm2vec_varlen``: packed calls (no mask) get none; a padded call whose
    recorded implementation takes the 2D padding mask (flash-attention) gets it, as transformers'
    flash mask function does. SDPA, eager and flex fallbacks never get here: the bidirectional hook
    hands them a ready 4D mask, which transformers passes through unchanged."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    return attention_mask[:, -kv_length:] if kv_length else attention_mask


def register() -> str:
    """Register ``llm2vec_varlen`` with transformers (idempotent); returns the name."""
    if not _state["registered"]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask_only)
        _state["registered"] = True
    return ATTN_IMPLEMENTATION


@contextlib.contextmanager
def padded_forward() -> Iterator[None]:
    """Mark the block as a padded forward, also when it runs inside a packed one."""
    token = None if torch.compiler.is_compiling() else _packed_forward.set(None)
    try:
        yield
    finally:
        if token is not None:
            _packed_forward.reset(token)


def packed_hidden_states(net: nn.Module, model: nn.Module, features: dict) -> torch.Tensor:
    """Last hidden states ``[T, D]`` of a packed batch (:func:`llm2vec_fast.packing.pack`) run
    through ``net`` (``model`` itself, or a peft / DDP wrapper of it) with the varlen attention
    for ``model``'s decoder. ``model`` must be bidirectional. Nothing is switched around the call:
    the packing metadata in the kwargs selects the kernel (see the module docstring)."""
    from .bidirectional import decoder_of, is_bidirectional, is_supported_family

    if not is_bidirectional(model):
        raise ValueError("the packed path needs a bidirectional model (enable_bidirectional=True)")
    use_varlen_attention(decoder_of(model))
    cu_seqlens, max_seqlen = features["cu_seqlens"], features["max_seqlen"]
    call = None if torch.compiler.is_compiling() else _PackedCall()  # dynamo cannot trace ContextVar.set
    token = None if call is None else _packed_forward.set(call)
    try:
        out = net(
            input_ids=features["input_ids"],
            position_ids=features["position_ids"],
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
        )
    finally:
        if token is not None:
            _packed_forward.reset(token)
    # the supported families route through the attention interface (also when compiled, where nothing counts)
    if call is not None and call.attention_calls == 0 and not is_supported_family(model):
        raise UnsupportedArchitectureError(
            f"no attention layer of this {model.config.model_type} model received the packing metadata (its attention does not go "
            f"through transformers' attention interface), {_NO_PACKING}"
        )
    return out.last_hidden_state[0]


_install_lock = threading.Lock()


def use_varlen_attention(decoder: nn.Module) -> None:
    """Route ``decoder``'s attention through ``llm2vec_varlen`` (idempotent, thread-safe).

    The implementation the config selected until now is recorded on the decoder and its attention
    modules first, then the config is switched, so a padded call running meanwhile in another thread
    sees either the old implementation or ``llm2vec_varlen`` forwarding to it: the same attention
    either way. Setting ``config._attn_implementation`` later (e.g. to ``"eager"``) undoes it; the
    next packed call routes again, recording the new choice.
    """
    from .bidirectional import _attention_modules, attention_implementation

    config = decoder.config
    if attention_implementation(config) == ATTN_IMPLEMENTATION:
        return
    register()
    # torch.compile cannot enter a lock; it replays the attribute writes after the graph instead
    with contextlib.nullcontext() if torch.compiler.is_compiling() else _install_lock:
        padded = attention_implementation(config)
        if padded == ATTN_IMPLEMENTATION:
            return
        for module in (decoder, *_attention_modules(decoder)):
            setattr(module, PADDED_ATTENTION_ATTRIBUTE, padded)
        config._attn_implementation = ATTN_IMPLEMENTATION
