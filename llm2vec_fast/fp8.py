"""FP8 W8A8 encoding: the decoder's linear layers as row-wise scaled float8 GEMMs.

Scheme (``float8_e4m3fn``, symmetric, one scale per row, ``scale = amax / 448``, values clamped to
``[-448, 448]`` before the cast, which otherwise turns out-of-range values into NaN):

* weights ``[out, in]``: one scale per output channel, quantized once when the model loads;
* activations ``[tokens, in]``: one scale per token, quantized at every call (dynamic), so one
  outlier token (the attention sinks of these models reach thousands) costs only its own row;
* product, ``quantization="fp8"``: ``torch._scaled_mm`` (fp8 tensor cores, fp32 accumulation, both
  scales applied in the epilogue, bf16 out) -- CUDA GPUs of compute capability 8.9+ (Ada, Hopper);
* product, ``quantization="fp8-simulated"``: the same fp8 values and scales (cast through
  ``torch.float8_e4m3fn`` by the same functions), multiplied as fp32 on any device, then scaled.
  It exists to measure the fidelity of the scheme without such a GPU (tests, the fidelity
  benchmark); in a model of the same dtype the two differ only in :meth:`FP8Linear.forward`'s matmul
  (summation order). Around the GEMMs the model runs in its own dtype: a bf16 model (a GPU's) is
  further from fp32 than an fp32 one, mostly through its residual stream (``docs/encoding.md``).

Weights are rounded by GPTQ by default (``rounding="gptq"``, :mod:`llm2vec_fast.gptq`): the same
e4m3 grid and scales, but each weight's e4m3 value chosen so that the layer's *output* on calibration
text (STS-B train; inputs rounded per token as the GEMM rounds them) stays closest to high
precision, calibrated layer after layer on the already-quantized model's outputs. On the trained
default encoder the weight rounding is most of FP8's error; GPTQ lets calibration keep more layers in
FP8 at a closer worst case (``docs/encoding.md``). ``rounding="nearest"`` rounds each weight to its
nearest e4m3 value (no calibration pass).

Layers whose simulated FP8 costs the embeddings too much stay in high precision: the decoder
layers are scored and chosen with the int8 export's machinery (:mod:`llm2vec_fast.layer_sensitivity`)
by :func:`calibrate_fp8_layers`. Linear layers whose sizes are not multiples of 16 (a
``_scaled_mm`` requirement) stay in high precision in both modes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .gptq import Grid
from .kernels import FP8Rows, fp8_quantize_rows
from .kernels.fp8_quant_reference import FP8_DTYPE, FP8_MAX, rowwise_scales

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("fp8", "fp8-simulated")
ROUNDINGS = ("gptq", "nearest")
#: STS-B train inputs GPTQ calibrates on (fewer leave H = X^T X of the wide MLP inputs rank-deficient
#: and the rounding fits those inputs, not text in general)
GPTQ_INPUTS = 512
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90): fp8 tensor cores
ALIGNMENT = 16  # _scaled_mm needs in_features and out_features divisible by 16
#: Calibration keeps a decoder layer in high precision unless FP8 there, and on all chosen layers
#: together, keeps these cosines to the high-precision embeddings on the calibration inputs. Stricter
#: than the fidelity targets (mean >= 0.99, worst >= 0.95): a minimum over ~100 calibration
#: inputs underestimates the tail on new text.
CALIBRATION_MIN_COS = 0.98
CALIBRATION_MEAN_COS = 0.995


class FP8UnsupportedError(RuntimeError):
    """FP8 GEMMs were asked for on a device that has none."""


def check_quantization(quantization: str | None) -> str | None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS} or None")
    return quantization


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown FP8 weight rounding {rounding!r}; expected one of {ROUNDINGS}")
    return rounding


def fp8_unsupported_reason(device: torch.device | str) -> str | None:
    """Why ``torch._scaled_mm`` FP8 GEMMs cannot run on ``device``; ``None`` when they can."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch {torch.__version__} has no torch._scaled_mm"
    if device.type != "cuda":
        return f"the device is {device.type}, not a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{device} does not exist ({torch.cuda.device_count()} CUDA device(s) visible)"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} is sm_{capability[0]}{capability[1]}, FP8 tensor cores need sm_89 or newer"
    return None


def check_fp8_device(device: torch.device | str) -> None:
    """Raise :class:`FP8UnsupportedError` naming the requirement unless ``device`` runs FP8 GEMMs."""
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise FP8UnsupportedError(
            f'quantization="fp8" runs torch._scaled_mm FP8 GEMMs, which need a CUDA GPU of compute capability 8.9 or newer '
            f'(Ada or Hopper: L4, L40S, RTX 4090, H100, H200); {reason}. quantization="fp8-simulated" reproduces its '
            "numerics on any device (slowly: for fidelity measurements)."
        )


# ------------------------------------------------------------------------ shared by both modes
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: ``x`` ``[rows, cols]`` as ``float8_e4m3fn`` with :func:`rowwise_scales`
    (``x ~= q * scales``, round to nearest even): one Triton pass on CUDA, torch elsewhere, same bits
    (:func:`llm2vec_fast.kernels.fp8_quantize_rows`)."""
    return fp8_quantize_rows(x)


def fake_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize of ``x`` ``[..., cols]`` with one scale per row, in ``x``'s dtype (the
    activation side, for calibration)."""
    q, scales = quantize_rows(x.reshape(-1, x.shape[-1]))
    return (q.float() * scales).reshape(x.shape).to(x.dtype)


def fake_fp8_weight(weight: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize of ``weight`` ``[out, in]`` with one scale per output channel."""
    q, scales = quantize_rows(weight)
    return (q.float() * scales).to(weight.dtype)


# ------------------------------------------------------------------------------------ the layer
class FP8Linear(nn.Module):
    """``nn.Linear`` as an FP8 W8A8 GEMM: weight ``float8_e4m3fn`` ``[out, in]`` with per-channel
    scales ``[1, out]``, input quantized per token at each call. ``simulate``: fp32 matmul of the
    fp8 values (any device) instead of ``torch._scaled_mm``."""

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scales: torch.Tensor,
        bias: torch.Tensor | None,
        simulate: bool,
        output_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.simulate = bool(simulate)
        self.output_dtype = output_dtype  # the model's dtype: the output dtype for pre-quantized inputs
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scales", weight_scales.reshape(1, -1).float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, simulate: bool, rounded: tuple[torch.Tensor, torch.Tensor] | None = None) -> FP8Linear:
        """``rounded``: the weight already in FP8 (``(q [out, in], scales [out, 1])``, e.g. GPTQ's);
        default: each weight rounded to its nearest e4m3 value."""
        q, scales = quantize_rows(linear.weight) if rounded is None else rounded
        if q.shape != linear.weight.shape or q.dtype != FP8_DTYPE:
            raise ValueError(f"rounded weight {tuple(q.shape)} {q.dtype} does not fit {linear} ({FP8_DTYPE} expected)")
        device = linear.weight.device
        return cls(q.to(device), scales.to(device), linear.bias, simulate, output_dtype=linear.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer multiplies by, ``[out, in]`` float32."""
        return self.weight_fp8.float() * self.weight_scales.t()

    def forward(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:
        """``x`` ``[..., in]``, or :class:`~llm2vec_fast.kernels.FP8Rows` already quantized per row
        (by the preceding norm's kernel, :func:`~llm2vec_fast.kernels.rms_norm_fp8`); the output is in
        ``x``'s dtype (the model's, :attr:`output_dtype`, for pre-quantized rows)."""
        if self.weight_fp8.dtype != FP8_DTYPE or self.weight_scales.dtype != torch.float32:
            # Module.to(dtype) casts every floating buffer, float8 included: the weights are no longer fp8
            raise RuntimeError(
                f"FP8Linear buffers were cast to {self.weight_fp8.dtype} / {self.weight_scales.dtype} (module.to(dtype) after "
                "quantization); load the encoder with the dtype you want (dtype=...) and quantization= instead"
            )
        if isinstance(x, FP8Rows):
            shape, out_dtype = x.shape, self.output_dtype
            q, scales = x.values.reshape(-1, self.in_features), x.scales.reshape(-1, 1)
        else:
            shape, out_dtype = x.shape, x.dtype
            q, scales = quantize_rows(x.reshape(-1, self.in_features))
        if self.simulate:
            # fp8 x fp8 products are exact in fp32; fp32 sums, then both scales: the GEMM's arithmetic
            y = (q.float() @ self.weight_fp8.float().t()) * (scales * self.weight_scales)
        else:
            # mat2 column-major (the transposed row-major weight), as _scaled_mm requires
            y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scales, scale_b=self.weight_scales, out_dtype=torch.bfloat16)
        y = y.to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "simulated" if self.simulate else "_scaled_mm"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"


def fp8_compatible(linear: nn.Linear) -> bool:
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


def quantize_linears(
    model: nn.Module, names: Iterable[str], simulate: bool, rounded: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> list[str]:
    """Replace the decoder's ``nn.Linear`` modules ``names`` (paths in the decoder, e.g.
    ``layers.3.mlp.down_proj``) by :class:`FP8Linear`, with the FP8 weights ``rounded[name]`` where
    given (else rounded to nearest); returns the names replaced (those whose sizes ``_scaled_mm``
    cannot take are kept and logged)."""
    from .bidirectional import decoder_of

    decoder = decoder_of(model)
    done, skipped = [], []
    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if not fp8_compatible(linear):
            skipped.append(name)
            continue
        setattr(parent, child, FP8Linear.from_linear(linear, simulate, (rounded or {}).get(name)))
        done.append(name)
    if skipped:
        logger.warning("%d linear layers keep high precision: sizes not multiples of %d (%s, ...)", len(skipped), ALIGNMENT, skipped[0])
    return done


# -------------------------------------------------------------------------------- calibration
def e4m3_grid() -> Grid:
    """The weights' grid for GPTQ: e4m3 values of each channel at :func:`rowwise_scales`."""
    return Grid(scales=lambda w: rowwise_scales(w)[:, 0], round=lambda x: x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float())


def gptq_fp8_weights(
    encoder, inputs: Sequence | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-rounded FP8 weights of the decoder's FP8-compatible linear layers, calibrated sequentially
    on ``inputs`` (default: :data:`GPTQ_INPUTS` STS-B train inputs) with activations rounded per
    token as :class:`FP8Linear` rounds them: ``{path: (q float8_e4m3fn [out, in], scales [out, 1])}``,
    on the model's device. The encoder is unchanged."""
    from .gptq import sequential_gptq
    from .layer_sensitivity import calibration_inputs, decoder_layer_linears

    inputs = list(inputs) if inputs is not None else calibration_inputs(GPTQ_INPUTS)
    layers = [{n: m for n, m in layer.items() if fp8_compatible(m)} for layer in decoder_layer_linears(encoder)]
    return sequential_gptq(
        encoder,
        inputs,
        layers,
        e4m3_grid(),
        fake_fp8_rows,
        store=lambda values, scale: (values.to(FP8_DTYPE), scale[:, None].float()),
        progress=progress,
    )


class _Dequantized(Mapping):
    """FP8 weights seen as the ``[out, in]`` weights they stand for, in each module's dtype, computed
    on access (a dequantized copy of an 8B model's weights would not fit beside it)."""

    def __init__(self, rounded: Mapping[str, tuple[torch.Tensor, torch.Tensor]], modules: Mapping[str, nn.Linear]):
        self.rounded, self.modules = rounded, modules

    def __getitem__(self, name: str) -> torch.Tensor:
        q, scales = self.rounded[name]
        return (q.float() * scales).to(self.modules[name].weight.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rounded)

    def __len__(self) -> int:
        return len(self.rounded)


def fp8_simulator(encoder, batch_size: int = 32, rounded: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A :class:`~llm2vec_fast.layer_sensitivity.QuantSimulator` of this module's FP8 scheme on
    ``encoder``, with the FP8 weights ``rounded`` where given (GPTQ's), else rounded to nearest
    (not cached: a second copy of an 8B model's weights is 16 GB)."""
    from .layer_sensitivity import QuantSimulator, decoder_layer_linears

    layers = decoder_layer_linears(encoder)
    modules = {n: m for layer in layers for n, m in layer.items()}
    weights = _Dequantized(rounded, modules) if rounded else None
    return QuantSimulator(
        encoder, fake_fp8_rows, fake_fp8_weight, layers=layers, batch_size=batch_size, cache_weights=False, rounded_weights=weights
    )


def calibrate_fp8_layers(
    encoder,
    inputs: Sequence | None = None,
    min_cos: float = CALIBRATION_MIN_COS,
    mean_cos: float = CALIBRATION_MEAN_COS,
    progress: Callable[[str], None] | None = None,
    rounded: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[list[int], dict]:
    """Decoder layers to keep in high precision, and the calibration summary: per-layer sensitivity
    of simulated FP8 (weights ``rounded`` where given, see :func:`fp8_simulator`) on ``inputs``
    (default: :func:`~llm2vec_fast.layer_sensitivity.calibration_inputs`, STS-B train sentences, a
    third with instructions), then the longest least-sensitive prefix of layers whose combined FP8
    keeps ``min_cos`` / ``mean_cos`` (see :mod:`llm2vec_fast.layer_sensitivity`)."""
    from .layer_sensitivity import SENSITIVITY_INPUTS, calibration_inputs, select_quantized_layers

    inputs = list(inputs) if inputs is not None else calibration_inputs()
    simulator = fp8_simulator(encoder, rounded=rounded)
    reference = simulator.embed(set(), inputs)
    probe = inputs[:SENSITIVITY_INPUTS]
    sensitivity = simulator.layer_sensitivity(probe, reference[: len(probe)], progress=progress)
    _, summary = select_quantized_layers(
        [sorted(layer) for layer in simulator.layers],
        sensitivity,
        lambda names: simulator.embed(names, inputs),
        reference,
        min_cos=min_cos,
        mean_cos=mean_cos,
        progress=progress,
        low="fp8",
        high="high_precision",
        engines=("torch-simulated", ""),
    )
    summary.update(calibration_inputs=len(inputs), sensitivity_inputs=len(probe))
    return summary["high_precision_layers"], summary


def apply_fp8(
    encoder,
    quantization: str,
    high_precision_layers: Sequence[int] | str = "calibrate",
    calibration_inputs: Sequence | None = None,
    rounding: str = "gptq",
    gptq_inputs: Sequence | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Quantize ``encoder``'s decoder layers to FP8 in place (``quantization``: ``"fp8"`` or
    ``"fp8-simulated"``), except ``high_precision_layers``: decoder layer indices, or
    ``"calibrate"`` to choose them with :func:`calibrate_fp8_layers` on ``calibration_inputs``
    (default: 96 STS-B train inputs). ``rounding``: ``"gptq"`` (:func:`gptq_fp8_weights`, on
    ``gptq_inputs``, default :data:`GPTQ_INPUTS` STS-B train inputs) or ``"nearest"``. Returns the
    report stored as ``encoder.quantization_report``."""
    import time

    check_quantization(quantization)
    check_rounding(rounding)
    if quantization == "fp8":
        check_fp8_device(encoder.device)
    model = encoder.model
    if hasattr(model, "peft_config"):
        raise ValueError("FP8 quantizes plain linear layers: merge the LoRA adapters first (merge_peft=True)")
    layers = [sorted(layer) for layer in _layer_names(encoder)]
    calibrate = isinstance(high_precision_layers, str)
    if calibrate and high_precision_layers != "calibrate":
        raise ValueError(f'high_precision_layers must be a list of decoder layer indices or "calibrate", got {high_precision_layers!r}')
    if not calibrate:
        keep = sorted({int(i) for i in high_precision_layers})
        bad = [i for i in keep if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(f"high_precision_layers {bad} out of range: the decoder has {len(layers)} layers")
    report: dict = {"scheme": quantization, "rounding": rounding}
    rounded = None
    if rounding == "gptq":
        start = time.perf_counter()
        rounded = gptq_fp8_weights(encoder, gptq_inputs, progress=progress)
        report["gptq_seconds"] = round(time.perf_counter() - start, 2)
    if calibrate:
        keep, calibration = calibrate_fp8_layers(encoder, calibration_inputs, progress=progress, rounded=rounded)
        report["calibration"] = calibration
    names = [n for i, layer in enumerate(layers) if i not in keep for n in layer]
    quantized = quantize_linears(model, names, simulate=quantization == "fp8-simulated", rounded=rounded)
    report.update(high_precision_layers=keep, fp8_linears=len(quantized), linears=sum(len(layer) for layer in layers))
    logger.info(
        "%s (%s rounding): %d of %d linear layers in FP8, decoder layers %s kept in high precision",
        quantization,
        rounding,
        len(quantized),
        report["linears"],
        keep,
    )
    encoder.quantization = quantization
    encoder.quantization_report = report
    return report


def _layer_names(encoder) -> list[list[str]]:
    from .layer_sensitivity import decoder_layer_linears

    return [list(layer) for layer in decoder_layer_linears(encoder)]
