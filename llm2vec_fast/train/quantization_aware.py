"""Quantization-aware training for the int8 ONNX export (``quantization_aware: int8``).

Every decoder linear layer that the int8 export can run in int8 computes, in training, what the
exported graph will compute (:mod:`llm2vec_fast.export.int8_rounding`, the export's own functions):

* its **effective weight**: the base weight plus the LoRA delta of the active adapter(s), i.e. the
  weight of the merged model the export sees, rounded to nearest per output channel on the
  export's grid (``levels`` 63 for 7-bit weights, 127 for 8-bit; :mod:`llm2vec_fast.export.cpu_int8`);
* its **input**, rounded to int8 per token (one scale ``max|x| / 127`` per row), as the graph's
  dynamic quantization does.

Linear layers without a LoRA adapter (``lora_layers``, ``lora_target_modules``) are rounded too:
the export quantizes them all the same. The backward is the straight-through estimator: both
roundings count as the identity, so the LoRA ``A`` / ``B`` weights receive the gradient of the
rounded forward's linear map (``dL/dW = g^T x_rounded``, taken through the low-rank path, so no
``[out, in]`` weight gradient is formed) and the input that of the rounded weight
(``dL/dx = g W_rounded``); the base weights stay frozen. LoRA dropout keeps its effect: in
training mode the dropped part of the adapter's input is added as
``B(A(dropout(x) - x)) * scaling`` (zero in eval mode, where the forward is exactly the export's).

Mechanism: each such module gets an instance ``forward`` (its class is untouched) and
:meth:`QuantizationAwareInt8.remove` deletes it again. No parameter, buffer or module is added, so
the state dict, the checkpoints and the saved adapter are an ordinary LoRA adapter. The rounded
weight is cached until a tensor it depends on changes (tensor version counters: the optimizer
step), so the micro-batches of one step and gradient checkpointing's recompute round once per step.
Weights changed in place through ``.data`` bypass the version counters: call :meth:`clear_cache`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8",)


def _lora_linear_class():
    from peft.tuners.lora import Linear

    return Linear


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder linear layers the int8 export can quantize, keyed by their path in the decoder
    (``layers.3.mlp.down_proj``, the names of :func:`~llm2vec_fast.layer_sensitivity.decoder_layer_linears`
    on the merged model): peft LoRA ``Linear`` wrappers and plain ``nn.Linear`` modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..bidirectional import decoder_of

    lora_linear = _lora_linear_class()
    found: dict[str, nn.Module] = {}
    for i, layer in enumerate(decoder_of(model).layers):
        wrappers: list[str] = []
        for sub, module in layer.named_modules():
            if any(sub.startswith(w + ".") for w in wrappers):
                continue  # the base layer and the lora_A / lora_B of a wrapper
            if isinstance(module, BaseTunerLayer):
                if type(module) is not lora_linear or not isinstance(module.get_base_layer(), nn.Linear):
                    raise ValueError(
                        f"quantization-aware training supports plain LoRA on nn.Linear; layers.{i}.{sub} is {type(module).__name__}"
                    )
                wrappers.append(sub)
                found[f"layers.{i}.{sub}"] = module
            elif isinstance(module, nn.Linear):
                found[f"layers.{i}.{sub}"] = module
    if not found:
        raise ValueError("no decoder linear layers found to train quantization-aware")
    return found


def _check_plain_lora(name: str, module: nn.Module) -> None:
    """Variants whose weight is not ``base + B @ A * scaling`` merge into something else: refused."""
    for adapter in module.lora_A:
        if module.use_dora.get(adapter) or module.lora_bias.get(adapter) or adapter in module.lora_variant:
            raise ValueError(f"quantization-aware training supports plain LoRA only; {name} uses a LoRA variant (DoRA, lora_bias, ...)")
    if module.fan_in_fan_out:
        raise ValueError(f"quantization-aware training expects nn.Linear weights [out, in]; {name} has fan_in_fan_out")


def _straight_through(rounded: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``rounded`` in the forward (exactly: ``source - source`` adds 0), the identity to ``source``
    in the backward."""
    if not (torch.is_grad_enabled() and source.requires_grad):
        return rounded
    return rounded + (source - source.detach())


class QuantizationAwareInt8:
    """The int8 export's rounding simulated in every decoder linear layer of ``model`` (a peft LoRA
    model, or a plain decoder) with ``weight_bits`` 7 or 8 (see the module docstring). Use as a
    handle (``remove()``) or a context manager."""

    def __init__(self, model: nn.Module, weight_bits: int):
        from ..export.cpu_int8 import WEIGHT_LEVELS

        if weight_bits not in WEIGHT_LEVELS:
            raise ValueError(f"weight_bits must be one of {tuple(WEIGHT_LEVELS)}, got {weight_bits!r}")
        self.weight_bits = weight_bits
        self.levels = WEIGHT_LEVELS[weight_bits]
        self.modules = quantized_linears(model)
        lora_linear = _lora_linear_class()
        for name, module in self.modules.items():
            if "forward" in vars(module):
                raise ValueError(f"{name} already has its own forward (quantization-aware training attached twice?)")
            if isinstance(module, lora_linear):
                _check_plain_lora(name, module)
        self._cache: dict[int, tuple[tuple, torch.Tensor]] = {}
        for module in self.modules.values():
            forward = self._lora_forward if isinstance(module, lora_linear) else self._linear_forward
            module.forward = functools.partial(forward, module)

    # ------------------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Give every module its class's forward back (the model is an ordinary LoRA model again)."""
        for module in self.modules.values():
            vars(module).pop("forward", None)
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache.clear()

    def __enter__(self) -> QuantizationAwareInt8:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -------------------------------------------------------------------------------- rounding
    def _rounded_weight(self, module: nn.Module, base: torch.Tensor, delta_of) -> torch.Tensor:
        """The export's weight of ``module``: ``base + delta`` (``delta_of()``: the LoRA delta, or
        ``None``) rounded per output channel, in ``base``'s dtype, cached while its tensors are unchanged."""
        key = self._cache_key(module, base)
        hit = self._cache.get(id(module))
        if hit is not None and hit[0] == key:
            return hit[1]
        from ..export.int8_rounding import fake_int8_weight

        with torch.no_grad():
            delta = delta_of()
            effective = base if delta is None else base + delta  # what peft's merge computes
            rounded = fake_int8_weight(effective, self.levels).to(base.dtype)
        self._cache[id(module)] = (key, rounded)
        return rounded

    @staticmethod
    def _cache_key(module: nn.Module, base: torch.Tensor) -> tuple:
        """What the rounded weight depends on: the tensors (storage and in-place version) and the
        adapters' scalings."""
        adapters = _active_adapters(module)
        tensors = [base] + [w for a in adapters for w in (module.lora_A[a].weight, module.lora_B[a].weight)]
        return tuple((t.data_ptr(), t._version) for t in tensors), tuple((a, module.scaling[a]) for a in adapters)

    @staticmethod
    def _rounded_input(x: torch.Tensor) -> torch.Tensor:
        # rounded in float32 whatever the compute dtype (bf16 cannot hold the half steps of 127 levels)
        from ..export.int8_rounding import fake_int8_rows

        return _straight_through(fake_int8_rows(x.detach().float()).to(x.dtype), x)

    # -------------------------------------------------------------------------------- forwards
    def _linear_forward(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        weight = self._rounded_weight(module, module.weight, lambda: None)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(self._rounded_input(x), weight.to(x.dtype), bias)

    def _lora_forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or any(v is not None for v in kwargs.values()):
            raise ValueError(f"quantization-aware LoRA layers take only the input tensor, got extra arguments {list(kwargs) or args}")
        if module.disable_adapters and module.merged:
            module.unmerge()  # as peft's own forward does
        base = module.get_base_layer()
        adapters = _active_adapters(module)

        def delta() -> torch.Tensor | None:
            out = None
            for adapter in adapters:
                d = module.get_delta_weight(adapter)
                out = d if out is None else out + d
            return out

        weight = self._rounded_weight(module, base.weight, delta)
        x_rounded = self._rounded_input(x)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        y = F.linear(x_rounded, weight.to(x.dtype), bias)
        for adapter in adapters:
            term = self._adapter_term(module, adapter, x_rounded.detach())
            if term is not None:
                y = y + term.to(y.dtype)
        return y

    @staticmethod
    def _adapter_term(module: nn.Module, adapter: str, x_rounded: torch.Tensor) -> torch.Tensor | None:
        """What one adapter adds to the rounded forward (``None``: nothing). Its value is 0, or in
        training mode with LoRA dropout ``B(A(dropout(x) - x)) * scaling`` (peft's dropout; the rest
        of the adapter is in the rounded weight). Its gradient is the straight-through one,
        ``dL/d(B @ A * scaling) = g^T x``, taken through the low-rank path (no ``[out, in]`` weight
        gradient is formed). It gives the input no gradient: that goes through the rounded weight."""
        a, b, scaling = module.lora_A[adapter], module.lora_B[adapter], module.scaling[adapter]
        dropout = module.lora_dropout[adapter]
        dropping = module.training and not isinstance(dropout, nn.Identity)
        if not (dropping or torch.is_grad_enabled()):
            return None
        x_rounded = x_rounded.to(a.weight.dtype)
        if not dropping:  # exactly 0 in the forward, the adapter's gradient in the backward
            value = b(a(x_rounded)) * scaling
            return value - value.detach()
        with torch.no_grad():
            undropped = b(a(x_rounded)) * scaling
        return b(a(dropout(x_rounded))) * scaling - undropped


def _active_adapters(module: nn.Module) -> list[str]:
    """Adapters whose delta is in the forward (none when disabled or already merged into the base)."""
    if not hasattr(module, "lora_A") or module.disable_adapters or module.merged:
        return []
    return [a for a in module.active_adapters if a in module.lora_A]
