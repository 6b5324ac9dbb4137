"""Fuse a decoder layer's QKV projections, and its gate/up projections, into single GEMMs.

``q_proj``, ``k_proj``, ``v_proj`` read the same input, as do the MLP's ``gate_proj`` and ``up_proj``:
stacking their weights along the output dim (``qkv_proj`` ``[q + k + v, in]``, ``gate_up_proj``
``[2 * ffn, in]``) turns three (two) GEMMs into one with a wider output, which keeps the tensor cores
busier at small token counts and launches fewer kernels. Each output column is the same dot product
as before, so the result equals the separate projections (bit for bit on CPU in float32, see
``tests/test_fused_layers.py``).

Only plain ``nn.Linear`` layers of one dtype and device, all with or all without a bias, are fused:
a LoRA layer that is not merged, an :class:`~llm2vec_fast.fp8.FP8Linear` or mismatched weights stay
separate (the report says why). FP8 quantized *after* fusion gives the same numbers as FP8 of the
separate layers: its scales are per output channel and per token, and the token rows are the same.

The fused modules are read by :mod:`llm2vec_fast.fused_layers`' attention and MLP forwards, which this
transform installs; a fused model's ``state_dict`` has the fused names, so it is not saved as a
Hugging Face checkpoint (save the encoder before fusing).
"""

from __future__ import annotations

import torch
from torch import nn

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
#: Attribute names of the fused modules and of their split sizes (output columns per part).
QKV_FUSED, GATE_UP_FUSED = "qkv_proj", "gate_up_proj"
SPLIT_ATTRIBUTE = "llm2vec_fast_split_sizes"


def why_not_fusable(linears: list[nn.Module]) -> str | None:
    """Why ``linears`` cannot be stacked into one ``nn.Linear``; ``None`` when they can."""
    for layer in linears:
        if type(layer) is not nn.Linear:  # LoRA layers, FP8Linear, quantized layers subclass or replace it
            return f"{type(layer).__name__} is not a plain nn.Linear"
    first = linears[0]
    if any(layer.in_features != first.in_features for layer in linears):
        return "different input sizes"
    if any(layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device for layer in linears):
        return "weights of different dtypes or devices"
    if len({layer.bias is None for layer in linears}) != 1:
        return "some have a bias, some not"
    return None


@torch.no_grad()
def stack_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output is the outputs of ``linears`` side by side."""
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(layer.out_features for layer in linears), bias=has_bias, device="meta")
    fused.weight = nn.Parameter(torch.cat([layer.weight for layer in linears]), requires_grad=first.weight.requires_grad)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([layer.bias for layer in linears]), requires_grad=first.bias.requires_grad)
    return fused


def fuse_module_projections(module: nn.Module, names: tuple[str, ...], fused_name: str) -> str | None:
    """Replace ``module``'s projections ``names`` by one stacked ``fused_name``; returns why not, or
    ``None`` when fused (or already fused)."""
    if hasattr(module, fused_name):
        return None
    linears = [getattr(module, name, None) for name in names]
    if any(layer is None for layer in linears):
        return f"{type(module).__name__} has no {'/'.join(names)}"
    reason = why_not_fusable(linears)
    if reason is not None:
        return reason
    fused = stack_linears(linears)
    for name in names:
        delattr(module, name)
    setattr(module, fused_name, fused)
    setattr(module, SPLIT_ATTRIBUTE, tuple(layer.out_features for layer in linears))
    return None


def split_sizes(module: nn.Module) -> tuple[int, ...]:
    return getattr(module, SPLIT_ATTRIBUTE)
