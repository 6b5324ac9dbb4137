"""Fused Triton kernels with pure-torch references.

Public ops (each takes ``backend="auto" | "triton" | "torch"``; ``auto`` = Triton on CUDA tensors,
the torch reference on CPU; triton is imported lazily, so this package imports without it):

* :func:`flash_attn_varlen` -- packed bidirectional attention with GQA, logit soft-capping and
  attention dropout (Triton fwd + bwd); :func:`flash_attn_dropout_mask` returns its dropout mask.
* :func:`masked_pool`, :func:`masked_pool_varlen` -- mean / weighted_mean / last / first pooling
  over masked tokens, padded or packed (Triton fwd + fused bwd).
* :func:`rms_norm` -- RMSNorm with an optional fused residual add (Triton fwd, torch bwd).
* :func:`fp8_quantize_rows` -- row-wise FP8 (e4m3) quantization with one scale per row, in one pass
  (the activation side of FP8 W8A8 GEMMs; inference only); :func:`rms_norm_fp8` -- RMSNorm (with the
  optional residual add) and that quantization in one kernel; :func:`silu_mul_fp8` -- SwiGLU's
  ``silu(gate) * up`` and that quantization in one kernel.

Both packed ops run as ``torch.library`` custom ops (``torch.ops.llm2vec_fast.flash_attn_varlen_fwd``,
``..._bwd``, ``masked_pool_varlen_fwd``, ``..._bwd``) with fake implementations and registered
autograd, so ``torch.compile(fullgraph=True)`` traces them without graph breaks; neither reads
``cu_seqlens`` on the host unless asked to (``validate=True``) or it is free (a CPU tensor).
"""

_installed_kernels = None
if __name__ == "kernels":
    # This folder installs as llm2vec_fast.kernels. Imported as top-level ``kernels``, the repository
    # root is on sys.path (``python -m`` or ``python -c`` in a clone) and hides Hugging Face's
    # ``kernels`` package, which transformers >= 5.25 depends on and imports: load that one instead.
    import importlib.machinery
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None and _spec.origin is not None:  # not a bare folder
        _installed_kernels = _spec

if _installed_kernels is not None:
    import importlib.util

    _module = importlib.util.module_from_spec(_installed_kernels)
    sys.modules[__name__] = _module  # what `import kernels` returns
    _installed_kernels.loader.exec_module(_module)
else:
    from ._dispatch import cu_seqlens_from_lengths
    from .flash_attn import (
        SUPPORTED_HEAD_DIMS,
        dropout_philox_state,
        flash_attn_dropout_mask,
        flash_attn_varlen,
    )
    from .flash_attn_reference import attention_naive, flash_attn_varlen_reference
    from .fp8_quant import FP8Rows, fp8_quantize_rows, rms_norm_fp8, silu_mul_fp8
    from .fp8_quant_reference import fp8_quantize_rows_reference
    from .pooling import masked_pool, masked_pool_varlen
    from .pooling_reference import (
        POOLING_MODES,
        check_pooling_mode,
        masked_pool_reference,
        masked_pool_varlen_reference,
    )
    from .rms_norm import rms_norm
    from .rms_norm_reference import add_rms_norm_reference, rms_norm_reference

    __all__ = [
        "FP8Rows",
        "POOLING_MODES",
        "SUPPORTED_HEAD_DIMS",
        "attention_naive",
        "check_pooling_mode",
        "cu_seqlens_from_lengths",
        "dropout_philox_state",
        "flash_attn_dropout_mask",
        "flash_attn_varlen",
        "flash_attn_varlen_reference",
        "fp8_quantize_rows",
        "fp8_quantize_rows_reference",
        "masked_pool",
        "masked_pool_reference",
        "masked_pool_varlen",
        "masked_pool_varlen_reference",
        "add_rms_norm_reference",
        "rms_norm",
        "rms_norm_fp8",
        "silu_mul_fp8",
        "rms_norm_reference",
    ]
