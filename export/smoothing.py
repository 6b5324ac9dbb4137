"""SmoothQuant for the int8 export: move activation outliers into the weights, exactly in fp32.

Per-token int8 activations lose the small channels of a token whenever a few channels of it are
large: one step is ``max|x| / 127``. SmoothQuant (Xiao et al., 2023) divides each input channel
``j`` of a linear layer by ``s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)`` and multiplies
column ``j`` of the weight by ``s_j``: the product is unchanged, the activations are flatter and
the weights take some of the range. The division is folded into what produces the input, so the
graph gains no operation:

* q/k/v inputs: the layer's ``input_layernorm`` weight (one scale for the three projections);
* gate/up inputs: ``post_attention_layernorm``'s weight;
* down_proj input (``act(gate) * up``): the rows (and bias) of ``up_proj``;
* o_proj input (the attention output): the rows (and bias) of ``v_proj``. With grouped-query
  attention several query heads read one value head, so those o_proj channels share the value
  channel's scale (the largest of theirs).

``max|x_j|`` comes from the calibration inputs. What it buys on the shipped default encoder is in
``benchmarks/int8_levers.py``'s table (docs/benchmarks.md).

Supported: the pre-norm decoders Llama, Mistral, Qwen2 and Qwen3 (``SMOOTHING_FAMILIES``); others
raise :class:`SmoothingNotSupportedError`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

SMOOTHING_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_SMOOTHING_ALPHA = 0.5
_MIN = 1e-5  # keeps dead channels (max 0) from dividing by zero


class SmoothingNotSupportedError(ValueError):
    """The decoder's layout is not one SmoothQuant folding knows."""


def smoothing_supported(encoder) -> bool:
    return getattr(encoder.model.config, "model_type", None) in SMOOTHING_FAMILIES


def smoothed_copy(encoder, inputs: Sequence, alpha: float = DEFAULT_SMOOTHING_ALPHA, batch_size: int = 32):
    """A copy of the fp32 ``encoder`` with SmoothQuant scales (from the activations of ``inputs``)
    folded into its weights; it computes the same embeddings in exact arithmetic. ``encoder`` is
    left untouched."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha}")
    if not smoothing_supported(encoder):
        family = getattr(encoder.model.config, "model_type", type(encoder.model).__name__)
        raise SmoothingNotSupportedError(
            f"SmoothQuant folding supports {', '.join(SMOOTHING_FAMILIES)}; this model is {family!r} "
            "(export it without smoothing: --int8-smooth 0, Int8Options(smoothing=0))"
        )
    amax = input_channel_maxima(encoder, inputs, batch_size)
    smoothed = copy.deepcopy(encoder)
    with torch.no_grad():
        for layer, maxima in zip(smoothed.model.layers, amax):
            _fold(layer, maxima, alpha, smoothed.model.config)
    return smoothed


def input_channel_maxima(encoder, inputs: Sequence, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, ``max |x_j|`` over all tokens of ``inputs`` for the inputs of q/k/v
    (``"qkv"``), o_proj (``"o"``), gate/up (``"gate_up"``) and down_proj (``"down"``)."""
    layers = encoder.model.layers
    out: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        for key, module in (("qkv", a.q_proj), ("o", a.o_proj), ("gate_up", m.gate_proj), ("down", m.down_proj)):

            def hook(_module, args, i=i, key=key):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                out[i][key] = torch.maximum(out[i][key], x) if key in out[i] else x

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        encoder.encode(list(inputs), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
    finally:
        for h in hooks:
            h.remove()
    return out


def _scales(maxima: torch.Tensor, weights: Sequence[nn.Linear], alpha: float) -> torch.Tensor:
    w = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in weights]).amax(0)
    return (maxima.clamp(min=_MIN) ** alpha / w.clamp(min=_MIN) ** (1 - alpha)).clamp(min=_MIN)


def _scale_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.mul_(s.to(lin.weight.dtype))


def _divide_rows(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.div_(s.to(lin.weight.dtype)[:, None])
    if lin.bias is not None:
        lin.bias.div_(s.to(lin.bias.dtype))


def _fold(layer: nn.Module, maxima: dict[str, torch.Tensor], alpha: float, config) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    s = _scales(maxima["qkv"], (attn.q_proj, attn.k_proj, attn.v_proj), alpha)
    layer.input_layernorm.weight.div_(s.to(layer.input_layernorm.weight.dtype))
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        _scale_columns(lin, s)

    s = _scales(maxima["gate_up"], (mlp.gate_proj, mlp.up_proj), alpha)
    layer.post_attention_layernorm.weight.div_(s.to(layer.post_attention_layernorm.weight.dtype))
    for lin in (mlp.gate_proj, mlp.up_proj):
        _scale_columns(lin, s)

    s = _scales(maxima["down"], (mlp.down_proj,), alpha)
    _divide_rows(mlp.up_proj, s)
    _scale_columns(mlp.down_proj, s)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.o_proj.in_features // heads
    group = heads // kv_heads
    s = _scales(maxima["o"], (attn.o_proj,), alpha).view(kv_heads, group, head_dim).amax(1)  # one per value channel
    _divide_rows(attn.v_proj, s.reshape(-1))
    _scale_columns(attn.o_proj, s[:, None, :].expand(kv_heads, group, head_dim).reshape(-1))
