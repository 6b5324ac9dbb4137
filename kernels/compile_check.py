"""Compile every Triton kernel config for NVIDIA GPUs on a machine without one.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` runs
the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ``ptxas`` cubin) on the CPU. For each
case this module records the shared memory the kernel needs (checked against the card's limit:
163 KB on sm_80, 227 KB on sm_90) and the register spills ``ptxas -v`` reports (must be 0).

Cases: every autotune config of every kernel (attention forward, dK/dV, dQ, the backward
preprocess and the dropout-mask kernel; pooling chunk, combine, last/first and backward kernels;
the RMSNorm / residual-add + RMSNorm kernel at each row width of :data:`RMS_NORM_WIDTHS`, over a 16-bit
or a float32 residual stream (:data:`RESIDUAL_STREAMS`); the FP8
row quantization at each width of :data:`FP8_QUANT_WIDTHS`, the norm-then-quantize kernel at the
hidden sizes and SwiGLU-then-quantize at :data:`SWIGLU_WIDTHS`, sm_90 only: e4m3 needs sm_89+),
for head dims 64/80/128/256 (attention) or every pooling mode, fp16 and bf16, sm_80 and sm_90, with
attention dropout and logit soft-capping on and off, the chunked pooling forward with and without its
combine pass.

* ``--full``: the whole cartesian product (a few hundred compiles; slow on a small machine).
* default: a covering subset of it -- every config is compiled on each architecture, in each
  dtype, with dropout+softcap off and on, and for each head dim of its class (each mode for
  pooling); not every combination of those. Used by CI.

Compiles run in a process pool; results are cached as JSON next to Triton's own cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``), keyed by the kernel's source (Triton's
``cache_key``: its code and what it calls), case and Triton version, so an unchanged kernel is not
compiled again (editing an autotune table recompiles only the new rows).

Run: ``python -m llm2vec_fast.kernels.compile_check [--full] [--arch 80 90] [--jobs N] [--json out.json]``.
Exit status 1 when any case fails. Must run without ``TRITON_INTERPRET`` (the module re-executes
its workers with it unset).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

#: Shared memory per block (bytes) the compiled kernel may use: A100 163 KB, H100 227 KB.
SMEM_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
HEAD_DIMS = (64, 80, 128, 256)
DTYPES = ("fp16", "bf16")
#: (dropout, softcap): both off and both on (dropout and capping add code to the same loops; both on
#: is the largest kernel, both off the one inference runs).
ATTN_VARIANTS = ((False, False), (True, True))

_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


def attention_case(kernel: str, d: int, cfg, dtype: str, arch: int, dropout: bool, softcap: bool) -> dict:
    """One compile case of an autotuned attention kernel for head dim ``d`` and ``cfg`` (a
    ``triton.Config`` with ``BLOCK_M``, ``BLOCK_N`` and ``MAX_BLOCK_D``)."""
    block_d = max(16, 1 << (d - 1).bit_length())
    return dict(
        module="flash_attn_triton",
        kernel=kernel,
        arch=arch,
        dtype=dtype,
        D=d,
        config=f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}w{cfg.num_warps}s{cfg.num_stages}",
        constexprs=dict(GROUP=4, D=d, BLOCK_D=block_d, PRECISION="tf32", SOFTCAP=softcap, DROPOUT=dropout, **cfg.kwargs),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        variant=f"dropout={int(dropout)},softcap={int(softcap)}",
    )


def _attention_cases(fat) -> list[dict]:
    """Cases of the autotuned attention kernels: configs of the head-dim class of each dim."""
    cases = []
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        configs = getattr(fat, kernel).configs
        for d in HEAD_DIMS:
            block_d = max(16, 1 << (d - 1).bit_length())
            for cfg in fat._prune_by_head_dim(configs, {"BLOCK_D": block_d}):
                for dtype, arch, (dropout, softcap) in itertools.product(DTYPES, SMEM_LIMITS, ATTN_VARIANTS):
                    cases.append(attention_case(kernel, d, cfg, dtype, arch, dropout, softcap))
    for d, dtype, arch in itertools.product(HEAD_DIMS, DTYPES, SMEM_LIMITS):
        block_d = max(16, 1 << (d - 1).bit_length())
        cases.append(
            dict(
                module="flash_attn_triton",
                kernel="_bwd_preprocess_kernel",
                arch=arch,
                dtype=dtype,
                D=d,
                config="T64w4s3",
                constexprs=dict(D=d, BLOCK_D=block_d, BLOCK_T=64),
                num_warps=4,
                num_stages=3,
                variant="-",
            )
        )
    for arch in SMEM_LIMITS:
        cases.append(
            dict(
                module="flash_attn_triton",
                kernel="_dropout_mask_kernel",
                arch=arch,
                dtype="int8",
                D=0,
                config="32x32w4s3",
                constexprs=dict(BLOCK_M=32, BLOCK_N=32),
                num_warps=4,
                num_stages=3,
                variant="-",
            )
        )
    return cases


def _pooling_case(pt, kernel: str, mode: str, cfg, dtype: str, arch: int, path: str = "", **constexprs) -> dict:
    """``D`` names the mode (and the code path, e.g. ``mean/two-pass``): the covering subset keeps
    every (config, mode/path) pair."""
    block_t = f"{cfg.kwargs['BLOCK_T']}x" if "BLOCK_T" in cfg.kwargs else ""
    return dict(
        module="pooling_triton",
        kernel=kernel,
        arch=arch,
        dtype=dtype,
        D=mode + path,
        config=f"{block_t}{cfg.kwargs['BLOCK_D']}w{cfg.num_warps}",
        constexprs=dict(MODE=pt.MODE_IDS[mode], **constexprs, **cfg.kwargs),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        variant="-",
    )


def _pooling_cases(pt) -> list[dict]:
    """Pooling kernels, each mode they run (in the ``D`` column): the chunked mean/weighted_mean forward
    with and without the combine pass (``/two-pass``, ``/single``), the combine pass, the last/first
    kernel, the chunked backward."""
    import triton

    cases = []
    sums, selects = ("mean", "weighted_mean"), ("last", "first")
    combine = triton.Config({"BLOCK_C": pt.COMBINE_C, "BLOCK_D": pt.COMBINE_D}, num_warps=pt.COMBINE_WARPS)
    for dtype, arch in itertools.product(DTYPES, SMEM_LIMITS):
        for cfg, mode, single in itertools.product(pt._pool_chunk_kernel.configs, sums, (False, True)):
            cases.append(
                _pooling_case(
                    pt,
                    "_pool_chunk_kernel",
                    mode,
                    cfg,
                    dtype,
                    arch,
                    "/single" if single else "/two-pass",
                    SINGLE=single,
                    CHUNK_T=pt.CHUNK_T,
                )
            )
        for mode in sums:
            cases.append(_pooling_case(pt, "_pool_combine_kernel", mode, combine, dtype, arch, CHUNK_T=pt.CHUNK_T))
        for cfg, mode in itertools.product(pt._pool_select_kernel.configs, selects):
            cases.append(_pooling_case(pt, "_pool_select_kernel", mode, cfg, dtype, arch))
        for cfg, mode in itertools.product(pt._pool_bwd_kernel.configs, pt.MODE_IDS):
            cases.append(_pooling_case(pt, "_pool_bwd_kernel", mode, cfg, dtype, arch, CHUNK_T=pt.CHUNK_T))
    return cases


#: RMSNorm row widths: Qwen3's per-head q/k norms (64, 128), then hidden sizes of 135M, 1B, 8B and
#: 70B-class models; the launch config follows from the width (``rms_norm_triton.launch_config``).
RMS_NORM_WIDTHS = (64, 128, 576, 2048, 4096, 8192)


def _row_kernel_case(
    rt, kernel: str, d: int, dtype: str, arch: int, variant: str, operands: int = 1, arg_types: dict | None = None, **constexprs
) -> dict:
    """A case of a row-tiled kernel (whole rows in registers, ``operands`` per token) of module
    ``rt``, whose ``launch_config(d, operands)`` gives the tile and warps; ``arg_types`` overrides
    the pointer types of some arguments (a float32 residual stream)."""
    block_t, block_d, warps = rt.launch_config(d, operands)
    rows = f"{block_t}x" if operands == 1 else f"{block_t}x{operands}x"
    return dict(
        module=rt.__name__.rpartition(".")[2],
        kernel=kernel,
        arch=arch,
        dtype=dtype,
        D=d,
        config=f"{rows}{block_d}w{warps}",
        constexprs=dict(**constexprs, BLOCK_T=block_t, BLOCK_D=block_d),
        num_warps=warps,
        num_stages=1,
        variant=variant,
        **({"arg_types": arg_types} if arg_types else {}),
    )


#: How a norm kernel meets the residual stream: (name, has the residual add, float32 stream). Under a
#: float32 stream the plain norm reads float32 rows (``X``), the fused one adds a 16-bit branch output
#: to a float32 residual (``R``) and writes a float32 sum (``S``); the normalised rows are 16-bit.
RESIDUAL_STREAMS = (("none", False, False), ("add", True, False), ("none-fp32", False, True), ("add-fp32", True, True))


def _stream_types(residual: bool, fp32: bool) -> dict | None:
    if not fp32:
        return None
    return {"R": "*fp32", "S": "*fp32"} if residual else {"X": "*fp32"}


def _norm_cases(rt, kernel: str, widths, archs, fp8: bool = False) -> list[dict]:
    """A norm kernel at each width, plain and with the fused residual add, over a 16-bit or a float32
    residual stream, Llama and Gemma casts; ``fp8``: the norm-then-quantize kernel (its rows rounded
    to the 16-bit dtype the GEMMs read, the e4m3 cast in the kernel)."""
    return [
        _row_kernel_case(
            rt,
            kernel,
            d,
            dtype,
            arch,
            f"residual={stream},gemma={int(gemma)}",
            arg_types=_stream_types(residual, fp32),
            HAS_RESIDUAL=residual,
            GEMMA=gemma,
            **(dict(NORMED=dtype, CAST=True) if fp8 else {}),
        )
        for d, dtype, arch, (stream, residual, fp32), gemma in itertools.product(widths, DTYPES, archs, RESIDUAL_STREAMS, (False, True))
    ]


def _rms_norm_cases(rt) -> list[dict]:
    """The norm kernel at each width (see :func:`_norm_cases`), sm_80 and sm_90."""
    return _norm_cases(rt, "_rms_norm_fwd_kernel", RMS_NORM_WIDTHS, SMEM_LIMITS)


#: FP8 row quantization widths: the inputs of the decoder's linear layers (hidden and MLP sizes) of
#: the 135M, 1B and 8B shapes, and the widest row the kernel takes.
FP8_QUANT_WIDTHS = (576, 1536, 2048, 4096, 8192, 14336, 16384)
#: SwiGLU (silu(gate) * up, then FP8) output widths: the MLP sizes of the 135M, 1B and 8B shapes.
SWIGLU_WIDTHS = (1536, 8192, 14336)
#: FP8 tensor cores and the e4m3 cast start at sm_89; of the checked architectures only sm_90 has them.
FP8_ARCHS = (90,)


def _fp8_quant_cases(rt) -> list[dict]:
    """The FP8 row-quantization kernel at each width, reading fp16 or bf16, with the cast in the kernel;
    the norm-then-quantize kernel at the hidden sizes, plain and with the residual add, both casts."""
    quantize = [
        _row_kernel_case(rt, "_fp8_quantize_rows_kernel", d, dtype, arch, "cast", CAST=True)
        for d, dtype, arch in itertools.product(FP8_QUANT_WIDTHS, DTYPES, FP8_ARCHS)
    ]
    norm = _norm_cases(rt, "_rms_norm_fp8_kernel", RMS_NORM_WIDTHS[2:], FP8_ARCHS, fp8=True)
    swiglu = [  # gate and up in registers: two operands per token
        _row_kernel_case(rt, "_silu_mul_fp8_kernel", d, dtype, arch, "cast", operands=2, CAST=True)
        for d, dtype, arch in itertools.product(SWIGLU_WIDTHS, DTYPES, FP8_ARCHS)
    ]
    return quantize + norm + swiglu


def all_cases() -> list[dict]:
    """The full cartesian product of cases (see the module docstring)."""
    from . import flash_attn_triton, fp8_quant_triton, pooling_triton, rms_norm_triton

    if flash_attn_triton.INTERPRETED:
        raise RuntimeError("compile_check needs the GPU autotune tables: run it without TRITON_INTERPRET")
    return (
        _attention_cases(flash_attn_triton)
        + _pooling_cases(pooling_triton)
        + _rms_norm_cases(rms_norm_triton)
        + _fp8_quant_cases(fp8_quant_triton)
    )


def _factors(case: dict) -> dict:
    return {
        "config": (case["kernel"], case["config"]),
        "arch": case["arch"],
        "dtype": case["dtype"],
        "D": case["D"],
        "variant": case["variant"],
    }


def covering_cases(cases: list[dict]) -> list[dict]:
    """A greedy covering subset: per kernel, every pair (config, value of another factor) that occurs
    in ``cases`` -- config x arch, config x dtype, config x variant, config x head dim or mode --
    occurs in at least one kept case."""
    kept, covered = [], set()
    pairs_of = []
    for case in cases:
        f = _factors(case)
        names = sorted(f)
        pairs_of.append({(case["kernel"], a, f[a], b, f[b]) for a, b in itertools.combinations(names, 2) if "config" in (a, b)})
    remaining = set(range(len(cases)))
    while True:
        best, gain = None, 0
        for i in sorted(remaining):
            g = len(pairs_of[i] - covered)
            if g > gain:
                best, gain = i, g
        if best is None:
            return kept
        kept.append(cases[best])
        covered |= pairs_of[best]
        remaining.discard(best)


# --------------------------------------------------------------------------------------------
# compiling one case
# --------------------------------------------------------------------------------------------

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "int8": "*i8"}
# pointer and scalar argument types that are not "the data dtype" or i32
_ARG_TYPES = {
    "LSE": "*fp32",
    "DELTA": "*fp32",
    "CU": "*i32",
    "STATS": "*i32",
    "MASK": "*u8",
    "WS": "*fp32",
    "COUNTS": "*i32",
    "qk_scale": "fp32",
    "cap_scale": "fp32",
    "sm_scale": "fp32",
    "dropout_p": "fp32",
    "drop_scale": "fp32",
    "seed": "i64",
    "offset": "i64",
    "eps": "fp32",
}
_DATA_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "H", "OUT", "GOUT", "GH", "X", "R", "W", "Y", "S", "GU"}
#: Per-kernel overrides of :data:`_ARG_TYPES` (a name that means something else there).
_KERNEL_ARG_TYPES = {
    "_rms_norm_fwd_kernel": {"offset": "fp32"},
    "_fp8_quantize_rows_kernel": {"OUT_Q": "*fp8e4nv", "OUT_SCALE": "*fp32", "fp8_max": "fp32", "min_scale": "fp32"},
    "_rms_norm_fp8_kernel": {"OUT_Q": "*fp8e4nv", "OUT_SCALE": "*fp32", "fp8_max": "fp32", "min_scale": "fp32", "offset": "fp32"},
    "_silu_mul_fp8_kernel": {"OUT_Q": "*fp8e4nv", "OUT_SCALE": "*fp32", "fp8_max": "fp32", "min_scale": "fp32"},
}
#: Strides that are not multiples of 16 in general: ``stride_lh`` is the token count (the kernels do
#: not specialise on it) and the preprocess kernel's ``stride_dh`` and the dropout-mask kernel's strides are token counts too.
_UNALIGNED_STRIDES = {"stride_lh", "stride_dh", "stride_mh", "stride_mt"}
#: Other integer arguments Triton specialises as divisible by 16 in real launches: the hidden size.
_ALIGNED_INTS = {
    k: ("D",)
    for k in (
        "_pool_chunk_kernel",
        "_pool_combine_kernel",
        "_pool_select_kernel",
        "_pool_bwd_kernel",
        "_rms_norm_fwd_kernel",
        "_fp8_quantize_rows_kernel",
        "_rms_norm_fp8_kernel",
        "_silu_mul_fp8_kernel",
    )
}
#: The specialisation every case is compiled with (part of the cache key), see :func:`_signature`.
ALIGNED_ARGS = "16-byte aligned pointers, strides % 16 == 0"


def _signature(fn, case: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource``. ``attrs`` is the specialisation a real
    launch gets (:data:`ALIGNED_ARGS`): 16-byte aligned pointers and strides divisible by 16 -- as
    torch allocates them, and as every head dim of :data:`HEAD_DIMS` and every real hidden size gives
    -- so the registers, spills and shared memory checked here are those of the binary the GPU runs
    (without the hints Triton cannot vectorise loads and needs several times the registers)."""
    constexprs = case["constexprs"]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in case.get("arg_types", {}):
            signature[name] = case["arg_types"][name]
        elif name in _DATA_PTRS:
            signature[name] = _PTR[case["dtype"]]
        elif case["kernel"] == "_dropout_mask_kernel" and name == "MASK":
            signature[name] = "*i8"
        else:
            signature[name] = _KERNEL_ARG_TYPES.get(case["kernel"], {}).get(name) or _ARG_TYPES.get(name, "i32")
        if (
            signature[name].startswith("*")
            or name.startswith("stride_")
            and name not in _UNALIGNED_STRIDES
            or name in _ALIGNED_INTS.get(case["kernel"], ())
        ):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs


def _cache_path(case: dict, source_hash: str) -> Path:
    import triton

    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache") / "llm2vec_fast_compile_check"
    key = json.dumps({k: case[k] for k in sorted(case)}, sort_keys=True) + source_hash + triton.__version__ + ALIGNED_ARGS
    return root / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def compile_case(case: dict) -> dict:
    """Compile one case; returns it with ``ok``, ``shared``, ``smem_limit``, ``n_spills``, ``seconds``
    (and ``error`` when the compile fails)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"{__package__}.{case['module']}")
    kernel = getattr(module, case["kernel"])
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner wraps the JITFunction
    source_hash = fn.cache_key  # the kernel's source and the jitted functions and constexprs it uses
    cache = _cache_path(case, source_hash)
    if cache.exists():
        return {**case, **json.loads(cache.read_text()), "cached": True}
    signature, constexprs, attrs = _signature(fn, case)
    start = time.perf_counter()
    log = io.StringIO()
    result = dict(smem_limit=SMEM_LIMITS[case["arch"]])
    try:
        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v output: registers and spills
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", case["arch"], 32),
                options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]),
            )
        ptxas_log = log.getvalue()
        if not _SPILL_RE.search(ptxas_log):  # older Triton without the ptxas-log knob: run ptxas -v ourselves
            ptxas_log = _ptxas_log(compiled.asm["ptx"], case["arch"])
        spills = [int(a) + int(b) for a, b in _SPILL_RE.findall(ptxas_log)]
        regs = [int(n) for n in _REGS_RE.findall(ptxas_log)]
        result.update(
            shared=int(compiled.metadata.shared), n_spills=sum(spills), n_regs=max(regs, default=None), wgmma="wgmma" in compiled.asm["ptx"]
        )
        result["ok"] = result["shared"] <= result["smem_limit"] and result["n_spills"] == 0
        if not result["ok"]:
            result["error"] = f"shared {result['shared']} B (limit {result['smem_limit']}), {result['n_spills']} B spilled"
    except Exception as e:  # noqa: BLE001 -- report every failing case, not just the first
        result.update(ok=False, shared=None, n_spills=None, error=f"{type(e).__name__}: {str(e)[:2000]}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    if result.get("shared") is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result))
    return {**case, **result, "cached": False}


def _ptxas_log(ptx: str, arch: int) -> str:
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if "arch" in get_ptxas.__code__.co_varnames else get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    return out.stderr + out.stdout


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def run(full: bool = False, archs=tuple(SMEM_LIMITS), jobs: int | None = None, report=None) -> list[dict]:
    """Compile the cases (in a process pool) and return one result dict per case; ``report`` is
    called with each result as it arrives."""
    cases = [c for c in all_cases() if c["arch"] in archs]
    if not full:
        cases = covering_cases(cases)
    jobs = jobs or os.cpu_count() or 1
    results = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        for r in pool.map(compile_case, cases, chunksize=1):
            results.append(r)
            if report is not None:
                report(r)
    return results


def _line(r: dict) -> str:
    status = "ok  " if r["ok"] else "FAIL"
    return (
        f"{status} sm_{r['arch']} {r['kernel']:<24} {r['config']:<12} {r['dtype']} D={r['D']!s:<22} {r['variant']:<19} "
        f"shared={r['shared']} n_spills={r['n_spills']}{' (cached)' if r['cached'] else ''}" + (f"  {r['error']}" if not r["ok"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full cartesian product instead of a pairwise cover")
    parser.add_argument("--arch", type=int, nargs="+", default=list(SMEM_LIMITS), choices=list(SMEM_LIMITS))
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: all CPUs)")
    parser.add_argument("--json", default=None, help="write the per-case results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *(argv if argv is not None else sys.argv[1:])], env)
    start = time.perf_counter()
    results = run(args.full, tuple(args.arch), args.jobs, report=lambda r: print(_line(r), flush=True))
    failed = [r for r in results if not r["ok"]]
    print(
        f"{len(results)} cases, {len(failed)} failed, {sum(r['cached'] for r in results)} cached, "
        f"max n_spills={max((r['n_spills'] or 0) for r in results)}, {time.perf_counter() - start:.0f}s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
