"""Which int8 weights this CPU multiplies exactly: 8-bit with VNNI or AMX, 7-bit without.

ONNX Runtime's u8 x s8 GEMM (MLAS, behind ``MatMulIntegerToFloat``) uses ``vpmaddubsw`` on x86
CPUs without VNNI (AVX2, and AVX-512 without VNNI): it adds two u8 x s8 products into a
*saturating* int16, and 255 * 127 * 2 > 32767, so full-range 8-bit weights overflow (measured:
cosine 0.16 on the default model); 7-bit weights (|q| <= 63) cannot. With AVX512-VNNI or
AVX-VNNI (``vpdpbusd``, four products into an int32) or AMX (int32 tiles) nothing saturates, and
8-bit weights halve the weight rounding error. Other architectures get 7-bit weights (safe; not
measured here).

OpenVINO's x86 CPU plugin runs the int8-openvino export on int8 GEMMs only with VNNI (AVX-VNNI or
AVX-512 VNNI; AMX CPUs have the latter): only then does it quantize a MatMul's input at run time.
Without VNNI it widens the int8 weights to fp32 and multiplies in fp32 (measured on an AVX2-only
Zen 3 EPYC: outputs equal the fp32 product with the rounded weights to 3e-7), so the export is
weight-only int8 there and about as fast as fp32. Either way OpenVINO never saturates, so the
int8-openvino export takes 8-bit weights on every CPU (7-bit ones let one held-out instruction pair
fall to cosine 0.971 on that Zen 3; 8-bit: 0.997).
"""

from __future__ import annotations

import platform
from pathlib import Path

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products into int32: no saturation
OPENVINO_INT8_FLAGS = ("avx512_vnni", "avx_vnni")  # OpenVINO quantizes MatMul inputs only with one of these
REPORTED_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BF16_GEMM_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 bf16 dot products: torch's bf16 GEMMs are fast only with one of these
WEIGHT_LEVELS = {7: 63, 8: 127}  # symmetric integer range per weight bits
WEIGHT_CHOICES = ("auto", "7bit", "8bit")


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key : value`` pairs in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them: a
    virtual machine may show only "AMD EPYC", which covers Zen 2 to Zen 5 (AVX2-only to full-width
    AVX-512), and a speed ratio holds on one of them only."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown"
    family, model = info.get("cpu family"), info.get("model")
    return f"{name} (family {family}, model {model})" if family and model else name


def all_cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def cpu_flags() -> list[str]:
    """The SIMD / int8 / bf16 flags of this CPU that decide int8 and bf16 speed (sorted)."""
    flags = all_cpu_flags()
    return sorted(f for f in REPORTED_FLAGS if f in flags)


def has_int8_dot(flags: set[str] | None = None) -> bool:
    """Whether the CPU multiplies u8 x s8 without int16 saturation (VNNI or AMX)."""
    flags = all_cpu_flags() if flags is None else flags
    return any(f in flags for f in INT8_DOT_FLAGS)


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "x86")


def _x86_has_any(names: tuple[str, ...], flags: set[str] | None, machine: str | None) -> bool:
    """On x86, whether this CPU (or ``flags``) has one of ``names``; elsewhere True (assumed, not
    measured here)."""
    if not is_x86(machine):
        return True
    flags = all_cpu_flags() if flags is None else flags
    return any(f in flags for f in names)


def has_bf16_gemm(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether torch's CPU bf16 GEMMs run on bf16 instructions here: on x86 only with AVX512-BF16 or
    AMX-BF16 (without, they took 8x the time of fp32 on an AVX2-only Zen 3); elsewhere assumed."""
    return _x86_has_any(BF16_GEMM_FLAGS, flags, machine)


def openvino_quantizes_activations(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether OpenVINO's CPU plugin runs int8-weight MatMuls on int8 GEMMs here (quantizing their
    inputs at run time): on x86 only with VNNI; elsewhere assumed (not measured here)."""
    return _x86_has_any(OPENVINO_INT8_FLAGS, flags, machine)


def int8_weight_bits(choice: str = "auto", flags: set[str] | None = None, runtime: str = "onnxruntime") -> int:
    """7 or 8: ``"7bit"``/``"8bit"`` as asked; ``"auto"`` 8 where ``runtime`` multiplies 8-bit
    weights exactly on this CPU (or ``flags``): ONNX Runtime's int8 GEMM with VNNI/AMX only,
    OpenVINO always (VNNI, or fp32 from the widened weights without it)."""
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"int8 weights must be one of {WEIGHT_CHOICES}, got {choice!r}")
    if choice == "auto":
        return 8 if runtime == "openvino" or has_int8_dot(flags) else 7
    return int(choice[0])
