"""Turn a transformers decoder into a bidirectional encoder (LLM2Vec step 1).

transformers 5 decoders build their mask through ``masking_utils.create_causal_mask``,
which returns a 4D mask (or a flex ``BlockMask``) passed in by the caller unchanged. We therefore

1. set ``is_causal = False`` on every attention module (read by the flash-attention and SDPA
   integrations when no mask is given), and
2. register a forward pre-hook on the decoder that replaces the 2D padding mask (or a
   missing one) with a *bidirectional* padding mask in the form the attention implementation
   takes: additive 4D for ``eager``, boolean 4D for ``sdpa``, a ``BlockMask`` for
   ``flex_attention``. ``flash_attention_2`` / ``flash_attention_3`` keep the 2D padding mask and
   read ``is_causal`` (False); our packed ``llm2vec_varlen`` path is bidirectional by construction.

Any other attention implementation (paged, hub kernels, custom registrations) raises
:class:`UnsupportedAttentionError` naming the model type and the implementation, when the model is
made bidirectional and again on every forward (the implementation can be switched later): a model
never runs silently causal.

This works for every family (the official llm2vec Qwen2 model stays causal under
eager/SDPA because it never overrides the mask). Sliding-window layers (Mistral, Qwen2,
Gemma2) also see the full bidirectional mask, as in the official bidirectional models; under
flash-attention the window would stay (symmetric), so that combination raises instead.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
# attention implementation -> how the bidirectional padding mask reaches it
MASK_FORMS = {"eager": "additive", "sdpa": "boolean", "flex_attention": "block_mask"}
# implementations that take the 2D padding mask and honour the modules' `is_causal`
IS_CAUSAL_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
PACKED_IMPLEMENTATION = "llm2vec_varlen"  # llm2vec_fast.varlen_attention (bidirectional kernel)
# set by llm2vec_fast.varlen_attention.use_varlen_attention: the implementation padded calls use then
PADDED_ATTENTION_ATTRIBUTE = "_llm2vec_padded_attention"
SUPPORTED_ATTENTION = (*MASK_FORMS, *IS_CAUSAL_IMPLEMENTATIONS, PACKED_IMPLEMENTATION)


class UnsupportedArchitectureError(ValueError):
    """The model cannot be made bidirectional safely."""


class UnsupportedAttentionError(UnsupportedArchitectureError):
    """The model's attention implementation cannot be made bidirectional safely."""


def decoder_of(model: nn.Module) -> nn.Module:
    """The bare decoder stack (e.g. ``LlamaModel``) inside a base, causal-LM or peft model, or an
    ``LLM2Vec`` encoder around one."""
    from .encoder import LLM2Vec  # here: encoder imports this module

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
            return model
        if isinstance(model, LLM2Vec):
            inner = model.model
        else:
            prefix = getattr(model, "base_model_prefix", None)
            inner = getattr(model, prefix, None) if prefix else None
        if isinstance(inner, nn.Module):
            model = inner
        else:
            break
    return model


def _attention_modules(decoder: nn.Module) -> list[nn.Module]:
    return [m for m in decoder.modules() if hasattr(m, "is_causal") and m is not decoder]


def is_supported_family(model: nn.Module) -> bool:
    """Whether ``model`` (a decoder, a causal-LM, a peft or encoder wrapper of one) is of a family in
    :data:`SUPPORTED_MODEL_TYPES`, the ones tested end to end (the packed path included)."""
    return getattr(getattr(decoder_of(model), "config", None), "model_type", None) in SUPPORTED_MODEL_TYPES


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless the model's attention honours ``is_causal``
    and its masks come from transformers' ``masking_utils`` (which accept a ready 4D mask)."""
    decoder = decoder_of(model)
    config = getattr(decoder, "config", None)
    model_type = getattr(config, "model_type", type(decoder).__name__)
    if config is not None:
        check_attention_implementation(config)
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    module = sys.modules.get(type(decoder).__module__)
    uses_mask_api = module is not None and hasattr(module, "create_causal_mask")
    if not (uses_mask_api and _attention_modules(decoder)):
        raise UnsupportedArchitectureError(
            f"Cannot make model type {model_type!r} ({type(decoder).__name__}) bidirectional: its attention does not "
            f"honour `is_causal` or it does not build masks with transformers.masking_utils. Supported families: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}, and decoders whose attention honours `is_causal`. "
            f"Pass enable_bidirectional=False to use it as a causal encoder."
        )


def attention_implementation(config) -> str:
    """The attention implementation a config selects (transformers' default ``sdpa`` when unset)."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


def _uses_sliding_window(config) -> bool:
    if not getattr(config, "sliding_window", None):
        return False
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/Qwen3 keep a window size but disable it
        return False
    return True


def check_attention_implementation(config, impl: str | None = None) -> None:
    """Raise :class:`UnsupportedAttentionError` unless ``config``'s attention implementation (or
    ``impl``) can run bidirectionally (see the module docstring)."""
    impl = impl or attention_implementation(config)
    model_type = getattr(config, "model_type", "?")
    if impl not in SUPPORTED_ATTENTION:
        raise UnsupportedAttentionError(
            f"Cannot run model type {model_type!r} bidirectionally with attn_implementation={impl!r}: llm2vec_fast "
            f"can only make {', '.join(repr(a) for a in SUPPORTED_ATTENTION[:-1])} bidirectional. Load the model "
            f"with attn_implementation='sdpa' (or 'eager'), or pass enable_bidirectional=False for a causal encoder."
        )
    if impl in IS_CAUSAL_IMPLEMENTATIONS and _uses_sliding_window(config):
        raise UnsupportedAttentionError(
            f"Cannot run model type {model_type!r} bidirectionally with attn_implementation={impl!r}: its "
            f"sliding-window layers (sliding_window={config.sliding_window}) would keep a symmetric window under "
            f"flash-attention instead of seeing the whole input as on the other paths. Use attn_implementation='sdpa' "
            f"(or the packed path, LLM2Vec(packed=True))."
        )


def bidirectional_mask(attention_mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """A padding mask that lets every query see every real key, in the form ``attn_implementation`` takes.

    ``[B, 1, 1, L]`` boolean for SDPA-like kernels (true = attend); additive for ``eager``, with a
    finite minimum so a row without real keys never becomes NaN; a flex ``BlockMask`` over
    ``[B, L, L]`` for ``flex_attention``.
    """
    keep = attention_mask.to(torch.bool)
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        batch, length = keep.shape

        def padding_mask_mod(b, h, q_idx, kv_idx):
            return keep[b, kv_idx]

        return create_block_mask(padding_mask_mod, batch, None, length, length, device=keep.device)
    keep = keep[:, None, None, :]
    if attn_implementation == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


def _reference_tensor(args, kwargs) -> torch.Tensor:
    """``input_ids`` (or ``inputs_embeds``) of a decoder call: batch shape and device."""
    ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
    return kwargs["inputs_embeds"] if ref is None else ref


def _mask_hook(decoder: nn.Module, args: tuple, kwargs: dict):
    if not getattr(decoder, "_llm2vec_bidirectional", False):
        return None
    check_attention_implementation(decoder.config)  # the implementation may have been switched since
    impl = attention_implementation(decoder.config)
    if impl == PACKED_IMPLEMENTATION:
        if kwargs.get("cu_seq_lens_q") is not None:
            # a packed call: the varlen kernel separates the sequences itself. A ready all-true 4D mask
            # keeps transformers from building one -- and from reading position_ids on the host to
            # find the packed sequences (one GPU sync per forward).
            kwargs["attention_mask"] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=_reference_tensor(args, kwargs).device)
            return tuple(args), kwargs
        # a padded call, forwarded by llm2vec_varlen to the implementation recorded when it was installed
        impl = getattr(decoder, PADDED_ATTENTION_ATTRIBUTE, None) or "sdpa"
        check_attention_implementation(decoder.config, impl)
    if impl not in MASK_FORMS:
        return None  # flash reads `is_causal` (set False) with the 2D mask; the varlen kernel is bidirectional
    args = list(args)
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    if mask is not None and len(mask.shape) == 4:  # a ready 4D mask or BlockMask: the caller's choice
        return None
    if mask is None:
        ref = _reference_tensor(args, kwargs)
        mask = torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
    dtype = decoder.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    new_mask = bidirectional_mask(mask, impl, dtype)
    if len(args) > 1:
        args[1] = new_mask
    else:
        kwargs["attention_mask"] = new_mask
    return tuple(args), kwargs


def enable_bidirectional(model: nn.Module) -> nn.Module:
    """Make ``model`` (base, causal-LM or peft-wrapped decoder) attend bidirectionally, in place."""
    check_supported(model)
    decoder = decoder_of(model)
    for module in _attention_modules(decoder):
        module.is_causal = False
    if not hasattr(decoder, "_llm2vec_mask_hook"):
        decoder._llm2vec_mask_hook = decoder.register_forward_pre_hook(_mask_hook, with_kwargs=True)
    decoder._llm2vec_bidirectional = True
    # register the packed path's attention now, not on its first call: that call may be traced by
    # torch.compile, and tracing register()'s transformers import is a graph break in some releases
    from .varlen_attention import register

    register()
    return model


def is_bidirectional(model: nn.Module) -> bool:
    return bool(getattr(decoder_of(model), "_llm2vec_bidirectional", False))
