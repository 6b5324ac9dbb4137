"""The ``nn.Module`` that is exported to ONNX: token batch in, pooled sentence embedding out.

Graph contract (all batch and sequence axes dynamic):

* inputs ``input_ids`` ``[B, L]`` int64, ``attention_mask`` ``[B, L]`` int64 (1 = real token,
  right padding), ``pool_mask`` ``[B, L]`` int64 (1 = pool this token; instruction tokens are
  attended to but have 0 here);
* output ``sentence_embedding`` ``[B, hidden]`` float32.

Position ids are computed inside the graph (``cumsum(attention_mask) - 1``, clamped at 0), so a
right-padded batch gets the same per-sequence positions as the torch encoder. Attention is
bidirectional (causal for an encoder loaded with ``enable_bidirectional=False``): the 4D additive
padding mask is built here, with a constant that is finite in
fp16 (a row without real keys gets a uniform softmax instead of NaN). Pooling is
``masked_pool_reference`` itself, in fp32.

For fp16 the decoder is exported from an fp16 copy: the transformers modelling code already
computes RMSNorm, the attention softmax and the rotary tables in fp32, and pooling is fp32 here.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..bidirectional import decoder_of, is_bidirectional
from ..encoding import KERNEL_POOLING_MODE
from ..fused_layers import has_fused_projections, is_fused
from ..kernels.pooling_reference import masked_pool_reference

INPUT_NAMES = ("input_ids", "attention_mask", "pool_mask")
OUTPUT_NAME = "sentence_embedding"  # not "embedding": that collides with a node name of the exported graph
# Additive attention-mask value: half the fp16 minimum, so it stays finite (and ``score + MASK``
# cannot round to -inf) after fp16 conversion. exp(MASK - max) is exactly 0 in fp32 and fp16.
MASK_VALUE = torch.finfo(torch.float16).min / 2


class NotExportableError(TypeError):
    """The object given to the exporter is not an exportable LLM2Vec encoder."""


class EncoderGraph(nn.Module):
    """Bidirectional decoder + masked pooling of an :class:`~llm2vec_fast.LLM2Vec` encoder."""

    def __init__(self, encoder, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from ..encoder import LLM2Vec

        if not isinstance(encoder, LLM2Vec):
            raise NotExportableError(f"export_onnx needs an llm2vec_fast.LLM2Vec encoder, got {type(encoder).__name__}")
        model = encoder.model
        if hasattr(model, "merge_and_unload"):
            raise NotExportableError(
                "the encoder holds unmerged LoRA adapters; load it with merge_peft=True (or merge them) before exporting"
            )
        if getattr(encoder, "quantization", None):
            raise NotExportableError(
                f"the encoder runs quantization={encoder.quantization!r}, which ONNX cannot hold; export an encoder loaded "
                "without it (the exporter makes int8/int4 graphs itself)"
            )
        if is_fused(model) or has_fused_projections(model):
            raise NotExportableError("the encoder has fused layers (fused=True); export an encoder loaded without them")
        self.decoder = decoder_of(model)
        if not (hasattr(self.decoder, "layers") and hasattr(self.decoder, "embed_tokens")):
            raise NotExportableError(f"cannot find the decoder stack inside {type(model).__name__}")
        # a causal encoder (enable_bidirectional=False, e.g. last-token pooling on a plain decoder) keeps
        # its causal mask: the 4D mask given to the decoder replaces the model's own
        self.causal = not is_bidirectional(model)
        config = self.decoder.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:  # a window no layer uses
            window = None
        if self.causal and window and int(window) < encoder.max_length:
            raise NotExportableError(
                f"a causal {config.model_type} encoder attends within a sliding window of {window} tokens, which the graph's "
                f"single causal mask cannot hold past {window} tokens; export it with max_length <= {window} "
                f"(now {encoder.max_length})"
            )
        if dtype is not None and dtype != self.decoder.embed_tokens.weight.dtype:
            # a converted copy: the caller's encoder keeps its weights (and its bidirectional hook)
            self.decoder = copy.deepcopy(self.decoder).to(dtype)
        self.pool_mode = KERNEL_POOLING_MODE[encoder.pooling_mode]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
        keep = attention_mask[:, None, None, :] > 0
        if self.causal:
            length = input_ids.shape[1]
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
        dtype = self.decoder.embed_tokens.weight.dtype
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, MASK_VALUE)
        hidden = self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return masked_pool_reference(hidden.float(), pool_mask, self.pool_mode)


@contextlib.contextmanager
def eager_attention(decoder: nn.Module):
    """Run ``decoder`` with the eager attention implementation (plain MatMul/Softmax nodes whose
    names carry the module path, which the fp16 conversion uses), restoring it afterwards."""
    configs = {id(m.config): m.config for m in decoder.modules() if hasattr(m, "config")}
    configs[id(decoder.config)] = decoder.config
    saved = {k: getattr(c, "_attn_implementation", None) for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


@contextlib.contextmanager
def traceable_longrope(decoder: nn.Module):
    """Let LongRoPE rotary embeddings (Phi-3 128k, Phi-3.5, Phi-4-mini) trace into ONNX.

    transformers switches between the short and the long frequencies by copying them into the
    ``inv_freq`` buffer in place (``aten::copy``, which the exporter cannot write). Here a pre-hook sets
    ``inv_freq`` to ``where(batch's longest position >= original_max_position_embeddings, long, short)``
    instead -- the same choice, as a graph op -- and transformers' own update is switched off."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    patched = []
    for module in decoder.modules():
        if getattr(module, "rope_type", None) != "longrope" or not hasattr(module, "original_inv_freq"):
            continue
        config = module.config
        params = getattr(config, "rope_parameters", None) or {}
        limit = int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)
        device = module.inv_freq.device
        long_inv_freq = ROPE_INIT_FUNCTIONS["longrope"](config, device, seq_len=limit + 1)[0].to(device)
        short_inv_freq = module.original_inv_freq.to(device)

        def choose_frequencies(mod, args, kwargs, long=long_inv_freq, short=short_inv_freq, limit=limit):
            position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
            mod.inv_freq = torch.where(position_ids.max() + 1 > limit, long, short)

        patched.append((module, module.inv_freq, module.register_forward_pre_hook(choose_frequencies, with_kwargs=True)))
        module.rope_type = "default"
    try:
        yield
    finally:
        for module, inv_freq, handle in patched:
            handle.remove()
            module.rope_type = "longrope"
            module.inv_freq = inv_freq
