"""Triton masked pooling (padded and packed) vs ``kernels/pooling_reference.py``, forward and backward.

Without CUDA the Triton code runs on CPU tensors through the Triton interpreter (see conftest.py).
Kernel outputs, gradients and the chunk workspace are NaN-poisoned before each launch, so unwritten
(or unwritten-but-read) elements fail. The ragged tests compare with a float64 ground truth: the
kernels' error must stay within 2x the torch reference's own error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llm2vec_fast.kernels import (
    POOLING_MODES,
    _dispatch,
    cu_seqlens_from_lengths,
    masked_pool,
    masked_pool_reference,
    masked_pool_varlen,
    masked_pool_varlen_reference,
)
from llm2vec_fast.kernels import pooling as pooling_module
from tolerances import rounding_tolerance

# CPU tensors under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1), CUDA otherwise.
DEVICE = _dispatch.triton_device() or "cpu"
needs_triton = pytest.mark.skipif(_dispatch.triton_device() is None, reason="needs triton: CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


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
    tol = rounding_tolerance(dtype, hidden.numel() // hidden.shape[-1])  # no sum is longer than all rows
    torch.testing.assert_close(out, ref, **tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    (grad_ref,) = torch.autograd.grad(ref, h_ref, grad_out)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_ref, **tol)
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
    out = compare(masked_pool_varlen, masked_pool_varlen_reference, hidden, (cu_from_lengths(lengths), mask.to(DEVICE)), mode, dtype)
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
    flat = masked_pool_varlen_reference(hidden.reshape(24, 16).to(DEVICE), cu_from_lengths([12, 12]), mask.reshape(24).to(DEVICE), mode)
    torch.testing.assert_close(out, flat)
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.isfinite(grad).all() and (grad[~mask.to(DEVICE)] == 0).all()


@needs_triton
def test_integer_mask_and_non_contiguous_hidden():
    hidden = torch.randn(3, 10, 64, device=DEVICE)[:, :, ::2]  # feature stride 2
    mask = (torch.rand(3, 10) < 0.5).to(device=DEVICE, dtype=torch.int64)
    out = masked_pool(hidden, mask, "weighted_mean", backend="triton")
    torch.testing.assert_close(out, masked_pool_reference(hidden, mask.bool(), "weighted_mean"), **rounding_tolerance(torch.float32, 10))


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 140), min_size=1, max_size=4),  # 0 to 3 chunks
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
    compare(masked_pool_varlen, masked_pool_varlen_reference, hidden, (cu_from_lengths(lengths), mask), mode, dtype, seed)


@needs_triton
@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq_len=st.integers(1, 140),
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
# chunked kernels: ragged sizes around the chunk boundaries, against a float64 ground truth
# ---------------------------------------------------------------------------------------------


def pool_weights_fp64(cu, mask, mode) -> torch.Tensor:
    """Normalised float64 weight of every row (rank j of the j-th pooled token for weighted_mean,
    one-hot on the last / first pooled token); zeros for unpooled rows and for sequences without any."""
    w = torch.zeros(mask.numel(), dtype=torch.float64)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        pooled = s + torch.nonzero(mask[s:e].cpu()).flatten()
        n = pooled.numel()
        if n == 0:
            continue
        if mode == "mean":
            w[pooled] = 1.0 / n
        elif mode == "weighted_mean":
            w[pooled] = torch.arange(1, n + 1, dtype=torch.float64) / (n * (n + 1) / 2)
        else:
            w[pooled[-1] if mode == "last" else pooled[0]] = 1.0
    return w


def segments(cu) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.cpu().diff().long())


def assert_within_2x_torch_error(got, torch_ref, exact, what):
    """``|got - exact| <= 2 |torch_ref - exact|`` (max over elements) plus fp32 rounding of the scale."""
    err = (got.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    torch_err = (torch_ref.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    assert err <= 2 * torch_err + 1e-7 * scale, f"{what}: error {err:.3g} vs torch's {torch_err:.3g} (scale {scale:.3g})"


def check_ragged(hidden, cu, mask, mode, dtype, max_seqlen=None, seed=0):
    """Forward (twice: bit-identical) and gradient of ``masked_pool_varlen`` against float64 and the
    torch reference's own error; returns the output."""
    h = hidden.to(DEVICE, dtype).requires_grad_()
    cu_d, mask_d = cu.to(DEVICE), mask.to(DEVICE)
    out = masked_pool_varlen(h, cu_d, mask_d, mode, max_seqlen=max_seqlen, backend="triton", validate=False)
    again = masked_pool_varlen(h, cu_d, mask_d, mode, max_seqlen=max_seqlen, backend="triton", validate=False)
    assert torch.equal(out, again), "two calls differ: the forward is not deterministic"
    h_ref = hidden.to(DEVICE, dtype).requires_grad_()
    ref = masked_pool_varlen_reference(h_ref, cu_d, mask_d, mode)
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    w = pool_weights_fp64(cu, mask, mode)
    seg = segments(cu)
    h64 = hidden.to(dtype).double()
    exact = torch.zeros(cu.numel() - 1, hidden.shape[1], dtype=torch.float64).index_add_(0, seg, w[:, None] * h64)
    assert_within_2x_torch_error(out, ref, exact, f"{mode} {dtype} forward")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    (grad_ref,) = torch.autograd.grad(ref, h_ref, grad_out)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    exact_grad = w[:, None] * grad_out.double().cpu()[seg]
    assert_within_2x_torch_error(grad, grad_ref, exact_grad, f"{mode} {dtype} gradient")
    assert (grad.cpu()[~mask.cpu()] == 0).all()
    return out


def ragged_batch(d=40, seed=3):
    """Sequences of 1, 97, 0, 200, 1025 and 130 rows (chunks of 64: shorter than one chunk, several,
    empty, 17 chunks) with the masks LLM2Vec pools with and the edge cases around chunk boundaries:
    an instruction prefix left out, pooled rows straddling chunk boundaries, nothing pooled."""
    from llm2vec_fast.kernels.pooling_triton import CHUNK_T

    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 97, 0, 200, 1025, 130]
    cu = cu_seqlens_from_lengths(lengths)
    mask = torch.zeros(sum(lengths), dtype=torch.bool)
    s = cu.tolist()
    mask[s[0]] = True  # length 1
    mask[s[1] + 10 : s[2]] = True  # instruction prefix of 10 tokens, the rest pooled (ends mid-chunk)
    mask[s[3] + CHUNK_T - 5 : s[3] + 2 * CHUNK_T + 9] = True  # straddles the boundaries at 64 and 128
    mask[s[4] + 100 : s[5]] = torch.rand(1025 - 100, generator=gen) < 0.5  # long prompt, then half pooled
    mask[s[4] + 1024] = True  # the very last row
    # the 130-row sequence pools nothing
    return torch.randn(sum(lengths), d, generator=gen), cu, mask


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_ragged_varlen_chunks(mode, dtype):
    hidden, cu, mask = ragged_batch()
    out = check_ragged(hidden, cu, mask, mode, dtype, max_seqlen=1025)
    assert (out[2] == 0).all() and (out[5] == 0).all()


@needs_triton
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_max_seqlen_only_sizes_the_grid(mode):
    """One chunk slot (the single-pass kernel takes whole sequences), the exact bound and a loose one
    give the same result: a too-small ``max_seqlen`` costs speed, never rows."""
    gen = torch.Generator().manual_seed(4)
    lengths = [150, 7, 64, 65, 0, 129]
    cu = cu_seqlens_from_lengths(lengths)
    hidden = torch.randn(sum(lengths), 24, generator=gen)
    mask = torch.rand(sum(lengths), generator=gen) < 0.7
    outs = [check_ragged(hidden, cu, mask, mode, torch.float32, max_seqlen=n) for n in (1, 64, 100, 150, 700)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_batch_without_tokens_pools_zeros(mode, backend):
    """``[B, 0, D]``: every sequence is empty, so each pools to zeros on both backends (the reference's
    ``last``/``first`` took amax/amin over an empty dim)."""
    if backend == "triton" and DEVICE is None:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = DEVICE if backend == "triton" else "cpu"
    out = masked_pool(torch.randn(3, 0, 8, device=device), torch.zeros(3, 0, dtype=torch.bool, device=device), mode, backend=backend)
    assert out.shape == (3, 8) and (out == 0).all()


@needs_triton
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_nothing_pooled_behaves_like_the_reference(mode):
    """A batch without a single pooled token (several chunks per sequence): zeros, zero gradients."""
    hidden = torch.randn(70 + 3 + 200, 33)
    cu = cu_seqlens_from_lengths([70, 3, 200])
    mask = torch.zeros(hidden.shape[0], dtype=torch.bool)
    out = check_ragged(hidden, cu, mask, mode, torch.float32)
    assert (out == 0).all()
    padded = masked_pool(hidden[:200].reshape(2, 100, 33).to(DEVICE), mask[:200].reshape(2, 100).to(DEVICE), mode, backend="triton")
    assert (padded == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_ragged_padded_chunks(mode, dtype):
    """Padded batch longer than three chunks: right padding, left padding, an instruction prefix, a
    row of one pooled token at a chunk boundary; ``[B, L, D]`` against float64 as packed rows."""
    gen = torch.Generator().manual_seed(5)
    batch, seq_len, d = 4, 200, 40
    hidden = torch.randn(batch, seq_len, d, generator=gen)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[0, 12:97] = True  # instruction of 12 tokens, right padding after 97
    mask[1, 80:] = True  # left padding
    mask[2, 64] = True  # one pooled token, first row of the second chunk
    mask[3] = torch.rand(seq_len, generator=gen) < 0.5
    h = hidden.to(DEVICE, dtype).requires_grad_()
    out = masked_pool(h, mask.to(DEVICE), mode, backend="triton")
    again = masked_pool(h, mask.to(DEVICE), mode, backend="triton")
    assert torch.equal(out, again)
    h_ref = hidden.to(DEVICE, dtype).requires_grad_()
    ref = masked_pool_reference(h_ref, mask.to(DEVICE), mode)
    cu = cu_seqlens_from_lengths([seq_len] * batch, "cpu")
    w = pool_weights_fp64(cu, mask.reshape(-1), mode)
    rows = hidden.to(dtype).double().reshape(batch * seq_len, d)
    exact = torch.zeros(batch, d, dtype=torch.float64).index_add_(0, segments(cu), w[:, None] * rows)
    assert_within_2x_torch_error(out, ref, exact, f"padded {mode} {dtype} forward")
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    (grad_ref,) = torch.autograd.grad(ref, h_ref, grad_out)
    exact_grad = (w[:, None] * grad_out.double().cpu()[segments(cu)]).reshape(batch, seq_len, d)
    assert_within_2x_torch_error(grad, grad_ref, exact_grad, f"padded {mode} {dtype} gradient")


@needs_triton
def test_chunk_grid_and_workspace_slots():
    """One chunk program per sequence up to CHUNK_T rows (the single-pass path); the workspace slot
    of chunk c of sequence b, ``cu[b] // CHUNK_T + b + c``, is distinct for every (b, c) and below
    ``workspace_slots(T, B)``, for skewed batches too (one long sequence among many short ones
    allocates by the tokens, not B x max_seqlen)."""
    import random

    from llm2vec_fast.kernels import pooling_triton as pt

    chunk = pt.CHUNK_T
    assert chunk & (chunk - 1) == 0
    assert pt.chunks_per_sequence(0) == pt.chunks_per_sequence(1) == pt.chunks_per_sequence(chunk) == 1
    assert pt.chunks_per_sequence(chunk + 1) == 2 and pt.chunks_per_sequence(16 * chunk + 1) == 17
    assert pt.chunks_per_sequence(10**9) == 65535  # CUDA's grid limit on axis 1; the last program takes the rest
    for cfg in pt._pool_chunk_kernel.configs + pt._pool_bwd_kernel.configs:
        assert chunk % cfg.kwargs["BLOCK_T"] == 0
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.choice([0, 1, chunk - 1, chunk, chunk + 1, rng.randint(0, 5 * chunk)]) for _ in range(rng.randint(1, 12))]
        starts = [sum(lengths[:b]) for b in range(len(lengths))]
        slots = [s // chunk + b + c for b, (s, n) in enumerate(zip(starts, lengths)) for c in range(-(-n // chunk))]
        assert len(set(slots)) == len(slots)
        assert all(0 <= x < pt.workspace_slots(sum(lengths), len(lengths)) for x in slots)
    assert pt.workspace_slots(8192 + 999, 1000) < 1000 * pt.chunks_per_sequence(8192) / 50


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
