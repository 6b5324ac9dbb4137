"""Error budgets shared by the numerics tests, derived from the dtype and the problem size."""

from __future__ import annotations

import torch


def accumulation_eps(exact: torch.Tensor, head_dim: int, max_seqlen: int) -> float:
    """What summing in another order than torch's may cost: Higham's worst-case bound for a float32
    sum of K terms (K * u, u the float32 unit roundoff), K the longest reduction (head dim or keys),
    relative to the largest exact value, or to 1, the order of the terms (unit-normal inputs), where
    the sum cancels (dq of a one-token sequence is exactly 0). Every dtype accumulates in float32 here, and the order of
    the sums is the one thing that differs between CPUs (BLAS kernels) and between the kernel's tiles
    and torch; a fixed constant held on one CPU and failed on another."""
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    magnitude = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    return max(head_dim, max_seqlen) * unit_roundoff * magnitude


def rounding_tolerance(dtype: torch.dtype, terms: int) -> dict[str, float]:
    """``assert_close`` tolerances for two computations of the same sums of ``terms`` values of
    order 1 in another order: in float32, the worst case of the summation (``terms * u``, relative
    and absolute); in float16/bfloat16 (accumulated in float32, rounded once at the end), two units
    of the dtype's precision, one rounding on each side."""
    if dtype == torch.float32:
        tol = terms * torch.finfo(torch.float32).eps / 2
    else:
        tol = 2 * torch.finfo(dtype).eps
    return dict(atol=tol, rtol=tol)


def assert_fp8_rows_close(got, ref, min_equal: float) -> None:
    """FP8 rows (``values``, ``scales``) from a fused kernel against the reference: scales within
    float32 rounding, e4m3 values equal but for rare neighbouring steps (a value that the kernel's
    float32 arithmetic put a rounding away from a step's midpoint; one step is 2**-3 relative)."""
    torch.testing.assert_close(got.scales, ref.scales, rtol=2**-20, atol=0)
    same = got.values.view(torch.uint8) == ref.values.view(torch.uint8)
    assert same.float().mean().item() >= min_equal, same.float().mean().item()
    a, b = (got.values.float() * got.scales)[~same], (ref.values.float() * ref.scales)[~same]
    assert torch.all((a - b).abs() <= 2**-3 * torch.maximum(a.abs(), b.abs()) + 1e-6)
