"""Backend selection, input checks and output allocation shared by the attention and pooling ops.

Nothing here imports triton, so the package imports on machines without it.

Backend rule (the ``backend=`` keyword of every public op):
  * ``"auto"``   -- Triton when every tensor is on CUDA (and triton is installed), the torch
                    reference otherwise. CPU tensors never reach the Triton interpreter.
  * ``"triton"`` -- force the Triton kernels. On CPU tensors this only works under the Triton
                    interpreter (``TRITON_INTERPRET=1`` set before triton is first imported);
                    it exists for the test suite.
  * ``"torch"``  -- force the pure-torch reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Sequence

import torch

BACKENDS = ("auto", "triton", "torch")

#: Set to ``1`` to fill every kernel output with NaN (ints with INT32_MIN) before the launch, so an
#: element that no program writes shows up in tests instead of silently holding stale memory.
POISON_ENV = "LLM2VEC_FAST_POISON_OUTPUTS"


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_device() -> str | None:
    """Where ``backend="triton"`` can run in this process: ``"cpu"`` under the interpreter,
    ``"cuda"`` with a GPU, ``None`` when it cannot run."""
    if not triton_available():
        return None
    if interpreter_enabled():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor]) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``backend`` and the op's tensor inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    on_cuda = [t.is_cuda for t in tensors]
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if all(on_cuda) and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if any(on_cuda) and not all(on_cuda):
        raise ValueError("backend='triton' needs every tensor on the same CUDA device (or all on CPU)")
    if not all(on_cuda) and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs the Triton interpreter, which needs TRITON_INTERPRET=1 "
            "in the environment before triton is imported (the test suite does this). "
            "Use backend='auto' or 'torch' for CPU inference."
        )
    return "triton"


def check_cu_seqlens_layout(cu_seqlens: torch.Tensor, name: str = "cu_seqlens") -> None:
    """Check what is known without reading ``cu_seqlens``' values: a 1-D int32 tensor ``[B+1]``.

    Costs no device-to-host copy (and traces under ``torch.compile``)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")


def should_validate(validate: bool | None, cu_seqlens: torch.Tensor) -> bool:
    """Whether an op reads ``cu_seqlens``' values to check them: ``validate=True`` always,
    ``False`` never, ``None`` (the default) only when that is free -- ``cu_seqlens`` in host memory
    and not under ``torch.compile`` -- so a CUDA call never synchronises for it."""
    if validate is not None:
        return bool(validate)
    return cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens") -> list[int]:
    """Validate a packed-batch offset vector and return it as a Python list.

    ``cu_seqlens`` must be a 1-D int32 tensor ``[B+1]`` that starts at 0, never decreases and ends at
    ``total`` (the number of packed rows). Reading the values costs one device-to-host copy when
    ``cu_seqlens`` is on a GPU: the ops call this only when asked to (``validate=True``) or when it is
    free (see :func:`should_validate`); :func:`llm2vec_fast.packing.pack` checks its batches once.
    """
    check_cu_seqlens_layout(cu_seqlens, name)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    if bounds[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {bounds[-1]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{name} must be non-decreasing")
    return bounds


def max_length(bounds: list[int]) -> int:
    return max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)


@contextlib.contextmanager
def poisoned_outputs():
    """Within this context kernel outputs start as NaN (see :data:`POISON_ENV`); for tests."""
    previous = os.environ.get(POISON_ENV)
    os.environ[POISON_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(POISON_ENV, None)
        else:
            os.environ[POISON_ENV] = previous


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 ``[B+1]`` offsets ``[0, l0, l0+l1, ...]`` for sequence lengths ``lengths``."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + int(n))
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor when ``LLM2VEC_FAST_POISON_OUTPUTS=1`` (tests)."""
    if os.environ.get(POISON_ENV, "0") == "1":
        fill = math.nan if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def autotune_cache_kwargs(autotune) -> dict:
    """``{"cache_results": True}`` when this Triton's ``autotune`` can store its choices on disk (in
    the Triton cache dir), so a new process starts without re-tuning; ``{}`` on older versions and
    under the interpreter (one config, nothing to tune)."""
    import inspect

    try:
        params = inspect.signature(autotune).parameters
    except (TypeError, ValueError):
        return {}
    return {"cache_results": True} if "cache_results" in params and not interpreter_enabled() else {}


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
