"""Turn a transformers decoder into a bidirectional encoder (LLM2Vec step 1).

transformers 5 decoders build their mask through ``masking_utils.create_causal_mask``,
which returns a 4D mask passed in by the caller unchanged. We therefore

1. set ``is_causal = False`` on every attention module (used by SDPA / flash kernels when
   no mask is given), and
2. register a forward pre-hook on the decoder that replaces the 2D padding mask (or a
   missing one) with a 4D *bidirectional* padding mask, so neither the eager nor the SDPA
   path ever applies the causal triangle.

This works for every family (the official llm2vec Qwen2 model stays causal under
eager/SDPA because it never overrides the mask). Sliding-window layers (Mistral, Qwen2,
Gemma2) also see the full bidirectional mask, as in the official bidirectional models.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


class UnsupportedArchitectureError(ValueError):
    """The model cannot be made bidirectional safely."""


def decoder_of(model: nn.Module) -> nn.Module:
    """The bare decoder stack (e.g. ``LlamaModel``) inside a base, causal-LM or peft model."""
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
            return model
        prefix = getattr(model, "base_model_prefix", None)
        inner = getattr(model, prefix, None) if prefix else None
        if isinstance(inner, nn.Module):
            model = inner
        else:
            break
    return model


def _attention_modules(decoder: nn.Module) -> list[nn.Module]:
    return [m for m in decoder.modules() if hasattr(m, "is_causal") and m is not decoder]


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless the model's attention honours ``is_causal``
    and its masks come from transformers' ``masking_utils`` (which accept a ready 4D mask)."""
    decoder = decoder_of(model)
    config = getattr(decoder, "config", None)
    model_type = getattr(config, "model_type", type(decoder).__name__)
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


def bidirectional_mask(attention_mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """4D ``[B, 1, 1, L]`` padding mask that lets every query see every real key.

    Boolean for SDPA-like kernels (true = attend); additive for ``eager``, with a finite
    minimum so a row without real keys never becomes NaN.
    """
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    if attn_implementation == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


def _mask_hook(decoder: nn.Module, args: tuple, kwargs: dict):
    if not getattr(decoder, "_llm2vec_bidirectional", False):
        return None
    impl = getattr(decoder.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl not in ("eager", "sdpa"):
        return None  # flash / custom varlen kernels read `is_causal` (set False) and their own metadata
    args = list(args)
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    if mask is not None and mask.dim() == 4:
        return None
    if mask is None:
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ref is None:
            ref = kwargs["inputs_embeds"]
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
    return model


def is_bidirectional(model: nn.Module) -> bool:
    return bool(getattr(decoder_of(model), "_llm2vec_bidirectional", False))
