"""Which int8 weights this CPU multiplies exactly: 8-bit with VNNI or AMX, 7-bit without.

ONNX Runtime's u8 x s8 GEMM (MLAS, behind ``MatMulIntegerToFloat``) uses ``vpmaddubsw`` on x86
CPUs without VNNI (AVX2, and AVX-512 without VNNI): it adds two u8 x s8 products into a
*saturating* int16, and 255 * 127 * 2 > 32767, so full-range 8-bit weights overflow (measured:
cosine 0.16 on the default model); 7-bit weights (|q| <= 63) cannot. With AVX512-VNNI or
AVX-VNNI (``vpdpbusd``, four products into an int32) or AMX (int32 tiles) nothing saturates, and
8-bit weights halve the weight rounding error. Other architectures get 7-bit weights (safe; not
measured here).
"""

from __future__ import annotations

import platform
from pathlib import Path

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products into int32: no saturation
REPORTED_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
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


def int8_weight_bits(choice: str = "auto", flags: set[str] | None = None) -> int:
    """7 or 8: ``"7bit"``/``"8bit"`` as asked, ``"auto"`` 8 with VNNI/AMX on this CPU (or ``flags``)."""
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"int8 weights must be one of {WEIGHT_CHOICES}, got {choice!r}")
    if choice == "auto":
        return 8 if has_int8_dot(flags) else 7
    return int(choice[0])
