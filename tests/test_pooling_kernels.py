"""Triton masked pooling (padded and packed) vs ``kernels/pooling_reference.py``, forward and backward.

Without CUDA the Triton code runs on CPU tensors through the Triton interpreter (see conftest.py).
Kernel outputs and gradients are NaN-poisoned before each launch, so unwritten elements fail.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm2vec_fast.kernels import (
    POOLING_MODES,
    cu_seqlens_from_lengths,
    masked_pool,
    masked_pool_reference,
    masked_pool_varlen,
    masked_pool_varlen_reference,
)
from llm2vec_fast.kernels import _dispatch
from llm2vec_fast.kernels import pooling as pooling_module

# CPU tensors under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1), CUDA otherwise.
DEVICE = _dispatch.triton_device() or "cpu"
needs_triton = pytest.mark.skipif(_dispatch.triton_device() is None, reason="needs triton: CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.fixture(autouse=True, scope="module")
def poison_outputs():
    with _dispatch.poisoned_outputs():
        yield


def cu_from_lengths(lengths, device=DEVICE) -> torch.Tensor:
    return cu_seqlens_from_lengths(lengths, device)


def compare(fn, ref_fn, hidden, args, mode, dtype, seed=0):
    """Forward and gradient of ``fn`` (Triton) against autograd through ``ref_fn``."""
    h = hidden.to(DEVICE, dtype).requires_grad_()
    h_ref = hidden.to(DEVICE, dtype).requires_grad_()
    out = fn(h, *args, mode, backend="triton")
    ref = ref_fn(h_ref, *args, mode)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    (grad_ref,) = torch.autograd.grad(ref, h_ref, grad_out)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, **TOL[dtype])
    return out


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_padded(mode, dtype):
    gen = torch.Generator().manual_seed(1)
    batch, seq_len, d = 4, 21, 40  # d not a multiple of the feature block
    hidden = torch.randn(batch, seq_len, d, generator=gen)
    mask = torch.rand(batch, seq_len, generator=gen) < 0.5
    mask[1] = False  # nothing to pool -> zeros
    mask[2] = False
    mask[2, 20] = True  # a single pooled token, the last position
    mask = mask.to(DEVICE)
    out = compare(masked_pool, masked_pool_reference, hidden, (mask,), mode, dtype)
    assert (out[1] == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_varlen(mode, dtype):
    gen = torch.Generator().manual_seed(2)
    lengths = [1, 0, 9, 30, 5]  # includes an empty sequence and one of length 1
    hidden = torch.randn(sum(lengths), 72, generator=gen)
    mask = torch.rand(sum(lengths), generator=gen) < 0.6
    mask[0] = True
    mask[40:] = False  # the last sequence pools nothing
    out = compare(masked_pool_varlen, masked_pool_varlen_reference, hidden, (cu_from_lengths(lengths), mask.to(DEVICE)),
                  mode, dtype)
    assert (out[1] == 0).all() and (out[4] == 0).all()


@needs_triton
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_unpooled_rows_are_never_read(mode):
    """NaN/Inf in padding or unpooled tokens must not reach the output or the gradient."""
    hidden = torch.randn(2, 12, 16)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 2:9] = True
    hidden[~mask] = float("nan")
    hidden[1, 0] = float("inf")
    h = hidden.to(DEVICE).requires_grad_()
    out = masked_pool(h, mask.to(DEVICE), mode, backend="triton")
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out, masked_pool_reference(hidden.to(DEVICE), mask.to(DEVICE), mode))
    flat = masked_pool_varlen_reference(hidden.reshape(24, 16).to(DEVICE), cu_from_lengths([12, 12]),
                                        mask.reshape(24).to(DEVICE), mode)
    torch.testing.assert_close(out, flat)
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.isfinite(grad).all() and (grad[~mask.to(DEVICE)] == 0).all()


@needs_triton
def test_integer_mask_and_non_contiguous_hidden():
    hidden = torch.randn(3, 10, 64, device=DEVICE)[:, :, ::2]  # feature stride 2
    mask = (torch.rand(3, 10) < 0.5).to(device=DEVICE, dtype=torch.int64)
    out = masked_pool(hidden, mask, "weighted_mean", backend="triton")
    torch.testing.assert_close(out, masked_pool_reference(hidden, mask.bool(), "weighted_mean"), atol=1e-5, rtol=1e-5)


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 24), min_size=1, max_size=5),
    d=st.integers(1, 70),
    mode=st.sampled_from(POOLING_MODES),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fuzz_varlen(lengths, d, mode, dtype, density, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hidden = torch.randn(n, d, generator=gen)
    mask = (torch.rand(n, generator=gen) < density).to(DEVICE)
    compare(masked_pool_varlen, masked_pool_varlen_reference, hidden, (cu_from_lengths(lengths), mask), mode, dtype,
            seed)


@needs_triton
@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq_len=st.integers(1, 20),
    d=st.integers(1, 40),
    mode=st.sampled_from(POOLING_MODES),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fuzz_padded(batch, seq_len, d, mode, density, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, d, generator=gen)
    mask = (torch.rand(batch, seq_len, generator=gen) < density).to(DEVICE)
    compare(masked_pool, masked_pool_reference, hidden, (mask,), mode, torch.float32, seed)


@needs_triton
def test_unwritten_gradient_rows_are_nan():
    """The poison is real: rows outside every sequence are never written by the backward."""
    from llm2vec_fast.kernels import pooling_triton

    cu = cu_from_lengths([3, 4])
    mask = torch.ones(10, dtype=torch.uint8, device=DEVICE)
    out, stats = pooling_triton.pool_forward(torch.randn(10, 8, device=DEVICE), cu, mask, "mean", 4)
    assert torch.isfinite(out).all() and stats.tolist() == [3, 4]
    grad = pooling_triton.pool_backward(torch.ones_like(out), cu, mask, stats, "mean", 10, torch.float32, 4)
    assert torch.isfinite(grad[:7]).all() and grad[7:].isnan().all()


# ---------------------------------------------------------------------------------------------
# dispatch and validation
# ---------------------------------------------------------------------------------------------


def test_auto_backend_on_cpu_uses_reference(monkeypatch):
    def fail():
        raise AssertionError("the Triton path ran on CPU tensors with backend='auto'")

    monkeypatch.setattr(pooling_module, "_triton_ops", fail)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.rand(2, 5) < 0.7
    torch.testing.assert_close(masked_pool(hidden, mask, "mean"), masked_pool_reference(hidden, mask, "mean"))
    cu = cu_from_lengths([4, 6], "cpu")
    out = masked_pool_varlen(hidden.reshape(10, 8), cu, mask.reshape(10), "last")
    torch.testing.assert_close(out, masked_pool_varlen_reference(hidden.reshape(10, 8), cu, mask.reshape(10), "last"))
    out.sum().backward()


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        masked_pool(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), "mean", backend="triton")


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 5), torch.ones(2, dtype=torch.bool), "mean"), "expected hidden"),
        ((torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool), "mean"), "expected hidden"),
        ((torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), "max"), "unknown pooling mode"),
        ((torch.randn(2, 5, 8).double(), torch.ones(2, 5, dtype=torch.bool), "mean"), "not supported"),
        ((torch.randn(2, 5, 8), torch.ones(2, 5), "mean"), "bool or integer"),
    ],
)
def test_padded_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        masked_pool(*args)


@pytest.mark.parametrize(
    "cu, mask, match",
    [
        (torch.tensor([0, 4, 10]), torch.ones(10, dtype=torch.bool), "int32"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), torch.ones(10, dtype=torch.bool), "must equal"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), torch.ones(10, dtype=torch.bool), "start at 0"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.ones(10, dtype=torch.bool), "non-decreasing"),
        (torch.tensor([0, 4, 10], dtype=torch.int32), torch.ones(9, dtype=torch.bool), "expected hidden"),
    ],
)
def test_varlen_bad_inputs(cu, mask, match):
    with pytest.raises(ValueError, match=match):
        masked_pool_varlen(torch.randn(10, 8), cu, mask, "mean")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        masked_pool(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), "mean", backend="cuda")
