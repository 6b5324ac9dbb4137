"""Fused decoder layers for Llama, Mistral, Qwen2, Qwen3 and Gemma models (``LLM2Vec.from_pretrained(..., fused=True)``).

:func:`fuse_decoder` rewrites a loaded decoder in place:

* every RMSNorm becomes :class:`FusedRMSNorm` (our Triton kernel, :func:`llm2vec_fast.kernels.rms_norm`),
  Qwen3's per-head ``q_norm``/``k_norm`` included (Gemma's with its float32 casts and ``1 + w``);
* each decoder layer forms ``residual + attention output`` and its ``post_attention_layernorm`` in one
  kernel (fused residual-add + RMSNorm), returning the new residual stream with the normalised input;
* rotary embeddings run Liger-Kernel's Triton RoPE (``liger_kernel.ops.rope``; one program per token
  reads that token's cos/sin row, so the packed layout -- ``[1, T, ...]``, positions restarting per
  sequence -- works as is);
* optionally (:func:`keep_residual_in_fp32`, on by default with FP8) the residual stream stays in
  float32 while the attention and MLP blocks run in the model's 16-bit dtype: the norms read the
  float32 sums and write 16-bit (or FP8) rows for the GEMMs;
* QKV and gate/up become single GEMMs (:mod:`llm2vec_fast.fused_projections`) where the weights allow,
  and SwiGLU runs Liger's kernel on the fused gate/up output (``LigerFusedGateUpSiLUMulFunction``:
  reads both halves of one buffer, no split copies; Gemma's GeGLU stays in torch).

The kernels run where the packed path's kernels run: Triton on CUDA tensors, the torch reference on
CPU (or wherever :func:`llm2vec_fast.varlen_attention.kernel_backend` says ``torch``). The references
are the Hugging Face models' own arithmetic, so on CPU a fused model gives the unfused model's bits
(except for a batch of a single token, where the CPU BLAS takes another path for the one-row stacked
GEMM than for the separate ones: float32 rounding, ~1e-6).
Modules keep their parameter names (``input_layernorm.weight``, ...) except the fused projections.

Other families raise :class:`UnsupportedFusionError` (nothing is changed). Adapters must be merged
(or the projections stay separate and LoRA keeps working: see :func:`fuse_decoder`); FP8 composes:
quantize after fusing and the fused projections become FP8 GEMMs of the same numerics, and a norm
whose projections all run FP8 hands them rows already quantized by its own kernel
(:func:`~llm2vec_fast.kernels.rms_norm_fp8`: the normalised activations are never written in bf16),
and an FP8 ``down_proj`` gets SwiGLU's product quantized by the SwiGLU kernel
(:func:`~llm2vec_fast.kernels.silu_mul_fp8`).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from .fp8 import FP8Linear
from .fused_projections import GATE_UP, GATE_UP_FUSED, QKV, QKV_FUSED, SPLIT_ATTRIBUTE, fuse_module_projections, split_sizes
from .kernels import FP8Rows, rms_norm, rms_norm_fp8, silu_mul_fp8
from .kernels._dispatch import resolve_backend

logger = logging.getLogger(__name__)

#: Decoder families with fused layers: attention class -> (has per-head q/k norms, sliding window source).
SUPPORTED_ATTENTION = {
    "LlamaAttention": (False, None),
    "MistralAttention": (False, "config"),
    "Qwen2Attention": (False, "module"),
    "Qwen3Attention": (True, "module"),
    "GemmaAttention": (False, None),
}
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
#: RMSNorm classes -> (casting mode, weight offset) of :func:`llm2vec_fast.kernels.rms_norm`.
_NORMS = {
    "LlamaRMSNorm": ("llama", 0.0),
    "MistralRMSNorm": ("llama", 0.0),
    "Qwen2RMSNorm": ("llama", 0.0),
    "Qwen3RMSNorm": ("llama", 0.0),
    "GemmaRMSNorm": ("gemma", 1.0),  # float32 throughout, scaled by 1 + weight
}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP"}
_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "GemmaDecoderLayer"}
_SILU = ("silu", "swish")
#: Set on fused attention / MLP modules: whether they run the Triton kernels (else torch only).
KERNELS_ATTRIBUTE = "llm2vec_fast_fused_kernels"
#: Set on decoder layers by :func:`keep_residual_in_fp32`: the residual stream's dtype (``None``: the model's).
RESIDUAL_DTYPE_ATTRIBUTE = "llm2vec_fast_residual_dtype"


class UnsupportedFusionError(ValueError):
    """The model's architecture has no fused layers."""


def _backend(module: nn.Module) -> str:
    """The kernel backend of this call: ``torch`` for a module fused without kernels, else the
    context-local choice of :func:`~llm2vec_fast.varlen_attention.kernel_backend`."""
    from .varlen_attention import current_backend

    return current_backend() if getattr(module, KERNELS_ATTRIBUTE, False) else "torch"


def _liger(name: str):
    try:
        if name == "rope":
            from liger_kernel.ops.rope import LigerRopeFunction

            return LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

        return LigerFusedGateUpSiLUMulFunction
    except ImportError as err:
        raise ImportError(
            "fused layers run Liger-Kernel's Triton RoPE and SwiGLU on the GPU: pip install liger-kernel (or load without fused=True)"
        ) from err


# ------------------------------------------------------------------------------------ norms
class FusedRMSNorm(nn.Module):
    """RMSNorm through :func:`llm2vec_fast.kernels.rms_norm` (keeps the replaced norm's ``weight``
    parameter, so the ``state_dict`` is unchanged); :meth:`add_and_norm` fuses the residual add."""

    def __init__(self, weight: nn.Parameter, eps: float, casting: str = "llama", offset: float = 0.0):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)
        self.casting, self.offset = casting, float(offset)
        setattr(self, KERNELS_ATTRIBUTE, True)

    @classmethod
    def replacing(cls, norm: nn.Module) -> FusedRMSNorm:
        """The fused norm for ``norm`` (a class of :data:`_NORMS`), sharing its weight."""
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None or not isinstance(getattr(norm, "weight", None), nn.Parameter):
            raise UnsupportedFusionError(f"{type(norm).__name__} has no weight / epsilon to fuse")
        return cls(norm.weight, eps, *_NORMS[type(norm).__name__])

    def _run(self, op, hidden_states: torch.Tensor, residual: torch.Tensor | None, out_dtype: torch.dtype | None):
        kwargs = dict(residual=residual, casting=self.casting, offset=self.offset, out_dtype=out_dtype, backend=_backend(self))
        return op(hidden_states, self.weight, self.variance_epsilon, **kwargs)

    def forward(self, hidden_states: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``norm(hidden_states)``, in ``out_dtype`` if given (a float32 residual stream's norms write
        the blocks' 16-bit dtype)."""
        return self._run(rms_norm, hidden_states, None, out_dtype)

    def add_and_norm(
        self, hidden_states: torch.Tensor, residual: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + hidden_states), residual + hidden_states)`` in one kernel."""
        return self._run(rms_norm, hidden_states, residual, out_dtype)

    def quantized(self, hidden_states: torch.Tensor, out_dtype: torch.dtype | None = None) -> FP8Rows:
        """``norm(hidden_states)`` quantized per row to FP8 in the same kernel (for FP8 projections)."""
        return self._run(rms_norm_fp8, hidden_states, None, out_dtype)

    def add_and_norm_quantized(
        self, hidden_states: torch.Tensor, residual: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> tuple[FP8Rows, torch.Tensor]:
        """``(norm(residual + hidden_states) in FP8, residual + hidden_states)`` in one kernel."""
        return self._run(rms_norm_fp8, hidden_states, residual, out_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, casting={self.casting}"


# ------------------------------------------------------------------------------------ rotary
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` ``[B, Hq, T, D]`` and ``k`` ``[B, Hkv, T, D]`` with ``cos``/``sin``
    ``[B or 1, T, D]`` (the model's rotary output, one row per token): Liger's Triton kernel, or the
    Hugging Face formula (``q * cos + rotate_half(q) * sin``) in torch."""
    if resolve_backend(backend, (q, k, cos, sin)) == "triton":
        return _liger("rope").apply(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ------------------------------------------------------------------------------------ attention
class FusedAttention:
    """Mixin over a supported attention class: stacked QKV when present, fused norms, Liger RoPE."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = cache if cache is not None else past_key_values
        qk_norm, sliding = SUPPORTED_ATTENTION[self.llm2vec_fast_base.__name__]
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if hasattr(self, QKV_FUSED):
            q, k, v = self.qkv_proj(hidden_states).split(split_sizes(self), dim=-1)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin, _backend(self))
        if cache is not None:  # transformers passes one when config.use_cache is on; as in the original forward
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        extra = {}
        if sliding == "module":
            extra["sliding_window"] = self.sliding_window
        elif sliding == "config":
            extra["sliding_window"] = getattr(self.config, "sliding_window", None)
        eager = sys.modules[self.llm2vec_fast_base.__module__].eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


# ------------------------------------------------------------------------------------ MLP
class FusedMLP:
    """Mixin over a supported MLP class: stacked gate/up when present, Liger SwiGLU on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, GATE_UP_FUSED):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.gate_up_proj(x)
        silu = getattr(self.config, "hidden_act", None) in _SILU
        if silu and isinstance(self.down_proj, FP8Linear):
            # SwiGLU and down_proj's input quantization in one kernel: the product is never written in bf16
            return self.down_proj(silu_mul_fp8(gate_up, backend=_backend(self)))
        on_triton = resolve_backend(_backend(self), (gate_up,)) == "triton"
        if silu and on_triton:
            return self.down_proj(_liger("swiglu").apply(gate_up))
        gate, up = gate_up.split(split_sizes(self), dim=-1)
        if not on_triton:  # the reference path: torch's GELU rounds a strided input's last bit differently
            gate = gate.contiguous()
        return self.down_proj(self.act_fn(gate) * up)


# ------------------------------------------------------------------------------------ layer
class FusedDecoderLayer:
    """Mixin over a supported decoder layer: residual add + ``post_attention_layernorm`` fused, and the
    residual stream optionally kept in float32 (:func:`keep_residual_in_fp32`)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual_dtype, block_dtype = getattr(self, RESIDUAL_DTYPE_ATTRIBUTE, None), None
        if residual_dtype is not None and residual_dtype != self.input_layernorm.weight.dtype:
            # a wider residual stream: the first layer widens the embeddings (exactly), the norms write
            # the blocks' dtype (their weights'), the blocks' outputs are added in the stream's
            block_dtype = self.input_layernorm.weight.dtype
            hidden_states = hidden_states.to(residual_dtype)
        residual = hidden_states
        norm = self.input_layernorm
        if isinstance(norm, FusedRMSNorm) and _reads_fp8(self.self_attn, QKV_FUSED, QKV):
            hidden_states = norm.quantized(hidden_states, block_dtype)  # the projections take the FP8 rows as they are
        elif isinstance(norm, FusedRMSNorm):
            hidden_states = norm(hidden_states, block_dtype)
        else:
            hidden_states = _cast(norm(hidden_states), block_dtype)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        norm = self.post_attention_layernorm
        if isinstance(norm, FusedRMSNorm) and _reads_fp8(self.mlp, GATE_UP_FUSED, GATE_UP):
            hidden_states, residual = norm.add_and_norm_quantized(hidden_states, residual, block_dtype)
        elif isinstance(norm, FusedRMSNorm):
            hidden_states, residual = norm.add_and_norm(hidden_states, residual, block_dtype)
        else:
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = _cast(norm(hidden_states), block_dtype)
        return residual + self.mlp(hidden_states)


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def _reads_fp8(module: nn.Module, stacked: str, separate: tuple[str, ...]) -> bool:
    """Whether every projection that reads ``module``'s input (the stacked one, where
    :mod:`~llm2vec_fast.fused_projections` made it, else ``separate``) is an FP8 GEMM: then the norm
    before it can hand over FP8 rows; a decoder layer kept in high precision has none."""
    names = (stacked,) if hasattr(module, stacked) else separate
    return all(isinstance(getattr(module, name, None), FP8Linear) for name in names)


_fused_classes: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` a subclass of its class with ``mixin``'s forward (parameters, buffers and
    names untouched)."""
    base = type(module)
    if issubclass(base, mixin):
        return
    key = (mixin, base)
    if key not in _fused_classes:
        _fused_classes[key] = type(f"Fused{base.__name__}", (mixin, base), {"llm2vec_fast_base": base, "__module__": base.__module__})
    module.__class__ = _fused_classes[key]


def _base_name(module: nn.Module) -> str:
    return getattr(type(module), "llm2vec_fast_base", type(module)).__name__


def check_fusable(decoder: nn.Module) -> None:
    """Raise :class:`UnsupportedFusionError` unless ``decoder`` (a bare ``AutoModel`` of a supported
    family, possibly peft-wrapped) has the layer structure the fused forwards expect."""
    layers = getattr(decoder, "layers", None)
    if layers is None or not len(layers):
        raise UnsupportedFusionError(f"{type(decoder).__name__} has no decoder layers to fuse")
    for layer in layers:
        parts = {
            "layer": (_base_name(layer), _LAYERS),
            "attention": (_base_name(getattr(layer, "self_attn", None)), set(SUPPORTED_ATTENTION)),
            "mlp": (_base_name(getattr(layer, "mlp", None)), _MLPS),
        }
        for what, (name, known) in parts.items():
            if name not in known:
                raise UnsupportedFusionError(
                    f"fused layers support the {', '.join(SUPPORTED_FAMILIES)} families; this model's {what} is {name} "
                    "(load without fused=True)"
                )


def fuse_decoder(model: nn.Module, kernels: bool = True, projections: bool = True) -> dict:
    """Fuse ``model``'s decoder (``AutoModel``, or a peft / encoder wrapper of it) in place.

    ``kernels``: fused norms (residual add included), Liger RoPE and SwiGLU on the Triton backend;
    ``projections``: stacked QKV and gate/up GEMMs where :func:`~llm2vec_fast.fused_projections.why_not_fusable`
    allows (LoRA layers that are not merged and FP8 layers stay separate). Idempotent. Returns a
    report: ``{"kernels", "norms", "qkv_fused", "gate_up_fused", "kept_separate": {reason: count}}``.

    Raises:
        UnsupportedFusionError: another architecture (the model is left unchanged).
    """
    from .bidirectional import decoder_of

    decoder = decoder_of(model)
    check_fusable(decoder)
    report = {"kernels": bool(kernels), "norms": 0, "qkv_fused": 0, "gate_up_fused": 0, "kept_separate": {}}

    def kept(reason: str | None) -> bool:
        if reason is not None:
            report["kept_separate"][reason] = report["kept_separate"].get(reason, 0) + 1
        return reason is None

    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if projections:
            report["qkv_fused"] += kept(fuse_module_projections(attention, QKV, QKV_FUSED))
            report["gate_up_fused"] += kept(fuse_module_projections(mlp, GATE_UP, GATE_UP_FUSED))
        for module, mixin in ((attention, FusedAttention), (mlp, FusedMLP), (layer, FusedDecoderLayer)):
            _swap_class(module, mixin)
            setattr(module, KERNELS_ATTRIBUTE, bool(kernels) or getattr(module, KERNELS_ATTRIBUTE, False))
    if kernels:
        for parent in list(decoder.modules()):
            for name, child in list(parent.named_children()):
                if type(child).__name__ in _NORMS:
                    setattr(parent, name, FusedRMSNorm.replacing(child))
                    report["norms"] += 1
    if report["kept_separate"]:
        logger.info("fused layers: projections kept separate: %s", report["kept_separate"])
    return report


def keep_residual_in_fp32(model: nn.Module, enabled: bool = True) -> None:
    """Keep ``model``'s residual stream in float32 (``enabled=False``: back to the model's dtype), in place.

    The embeddings are widened to float32 before the first decoder layer, each layer adds its
    attention and MLP outputs to the float32 stream, and its norms read the float32 sums and write
    the attention and MLP blocks' dtype (the dtype of the layer's norm weights: bf16 in a bf16 model),
    so every GEMM still runs in 16 bits; the final norm's output is float32 (Hugging Face's promotion
    of a bf16 weight times float32 rows). flash-attention calls this ``residual_in_fp32``. It costs
    memory traffic only (the stream is read and written in 4 bytes instead of 2), and in a bf16 model
    most of the distance to float32 embeddings is the rounding of that stream (``docs/encoding.md``).
    A no-op in a float32 model. With fused norms (:func:`fuse_decoder`) the residual add, the norm
    and the FP8 quantization of its output stay one kernel each; otherwise the decoder layers get the
    fused layer forward with the model's own norms, attention and MLP.

    Raises:
        UnsupportedFusionError: an architecture without fused layers (the model is left unchanged;
            ``enabled=False`` on a model whose stream was never widened does nothing, whatever its family).
    """
    from .bidirectional import decoder_of

    if not enabled and residual_dtype(model) is None:
        return  # nothing to undo (whatever the family)
    decoder = decoder_of(model)
    check_fusable(decoder)
    for layer in decoder.layers:
        _swap_class(layer, FusedDecoderLayer)
        setattr(layer, RESIDUAL_DTYPE_ATTRIBUTE, torch.float32 if enabled else None)


def wants_fp32_residual(requested: bool | None, quantization: str | None, dtype: torch.dtype, model: nn.Module) -> bool:
    """``LLM2Vec.from_pretrained``'s ``residual_in_fp32`` resolved: as requested, else on for a
    quantized (FP8) bf16/fp16 model of a family with fused layers (where it brings FP8's worst case
    within bf16's) and off otherwise (an explicit ``True`` on another family raises in
    :func:`keep_residual_in_fp32`)."""
    if requested is not None:
        return bool(requested)
    if quantization is None or dtype not in (torch.bfloat16, torch.float16):
        return False
    from .bidirectional import decoder_of

    try:
        check_fusable(decoder_of(model))
    except UnsupportedFusionError as err:
        logger.info("the residual stream stays in %s: %s", dtype, err)
        return False
    return True


def residual_dtype(model: nn.Module) -> torch.dtype | None:
    """The residual stream's dtype set by :func:`keep_residual_in_fp32` (``None``: the model's own)."""
    from .bidirectional import decoder_of

    layers = getattr(decoder_of(model), "layers", None) or []
    return next((getattr(layer, RESIDUAL_DTYPE_ATTRIBUTE, None) for layer in layers), None)


def is_fused(model: nn.Module) -> bool:
    """Whether :func:`fuse_decoder` has rewritten ``model``'s decoder."""
    from .bidirectional import decoder_of

    layers = getattr(decoder_of(model), "layers", None) or []
    # the attention, not the layer: keep_residual_in_fp32 gives unfused layers the fused layer forward
    return any(isinstance(getattr(layer, "self_attn", None), FusedAttention) for layer in layers)


def has_fused_projections(model: nn.Module) -> bool:
    """Whether :func:`fuse_decoder` stacked projections of ``model`` (a model's own stacked ones, such as
    Phi-3's ``qkv_proj``, are its checkpoint layout and do not count)."""
    return any(hasattr(m, SPLIT_ATTRIBUTE) for m in model.modules())
