"""Triton varlen attention vs float64 references (forward and dq/dk/dv).

Without CUDA these run the Triton kernels on CPU tensors through the Triton interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``); with CUDA they run the compiled kernels.
Error budget (flash-attention's rule): the kernel's max error against the float64 reference may be
at most twice the error of the same computation done by torch in the input dtype, plus a small
absolute epsilon, float32's worst-case error for the reduction length (``accumulation_eps``).
Every kernel output is NaN-poisoned before the launch, so an element no program writes fails the
comparison.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llm2vec_fast.kernels import (
    SUPPORTED_HEAD_DIMS,
    _dispatch,
    attention_naive,
    cu_seqlens_from_lengths,
    dropout_philox_state,
    flash_attn_dropout_mask,
    flash_attn_varlen,
    flash_attn_varlen_reference,
)
from llm2vec_fast.kernels import flash_attn as flash_attn_module
from tolerances import accumulation_eps

# CPU tensors under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1), CUDA otherwise.
DEVICE = _dispatch.triton_device() or "cpu"
needs_triton = pytest.mark.skipif(_dispatch.triton_device() is None, reason="needs triton: CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels only (bf16 tl.dot is wrong in the interpreter)")


@pytest.fixture(autouse=True, scope="module")
def poison_outputs():
    with _dispatch.poisoned_outputs():
        yield


def cu_from_lengths(lengths, device=DEVICE) -> torch.Tensor:
    return cu_seqlens_from_lengths(lengths, device)


def make_qkv(lengths, hq, hkv, d, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    return tuple(torch.randn(n, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv))


def check_against_fp64(lengths, hq, hkv, d, dtype, max_seqlen=None, seed=0, softcap=0.0, q_gain=1.0, dropout_p=0.0, softmax_scale=None):
    """Kernel vs float64 reference (forward and gradients) within twice torch's own error.

    ``q_gain`` scales the queries (larger logits, so soft-capping bites). With ``dropout_p`` the
    references apply the kernel's own keep-mask (:func:`flash_attn_dropout_mask`). Returns the
    float64 reference output."""
    q, k, v = make_qkv(lengths, hq, hkv, d, dtype, seed)
    if q_gain != 1.0:
        q = (q.detach() * q_gain).requires_grad_()
    cu = cu_from_lengths(lengths)
    max_seqlen = max(lengths) if max_seqlen is None else max_seqlen
    drop = {}
    if dropout_p > 0:
        torch.manual_seed(seed)
        mask = flash_attn_dropout_mask(cu, hq, max_seqlen, dropout_p, *dropout_philox_state(q, max_seqlen))
        drop = dict(dropout_p=dropout_p, dropout_mask=mask)
        torch.manual_seed(seed)
    out = flash_attn_varlen(q, k, v, cu, max_seqlen, dropout_p=dropout_p, softcap=softcap, softmax_scale=softmax_scale, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    exact_inputs = tuple(t.detach().double().requires_grad_() for t in (q, k, v))  # fp64 leaves: fp64 grads
    ref = attention_naive(*exact_inputs, cu, upcast=True, softcap=softcap, softmax_scale=softmax_scale, **drop)
    ref_grads = torch.autograd.grad(ref, exact_inputs, dout.double())
    same = attention_naive(q, k, v, cu, upcast=False, softcap=softcap, softmax_scale=softmax_scale, **drop)
    same_grads = torch.autograd.grad(same, (q, k, v), dout)

    for name, got, exact, torch_same in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (same, *same_grads)):
        assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten elements are NaN-poisoned)"
        err = (got.double() - exact).abs().max().item()
        budget = 2 * (torch_same.double() - exact).abs().max().item() + accumulation_eps(exact, d, max_seqlen)
        assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g} ({dtype}, D={d}, {lengths})"
    return ref.detach()


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_smollm2_heads_ragged(dtype):
    """SmolLM2 layout (9 q heads, 3 kv heads, D=64), ragged lengths, max_seqlen above the longest."""
    check_against_fp64([1, 7, 97, 200], 9, 3, 64, dtype, max_seqlen=256)


@needs_triton
def test_long_sequence():
    check_against_fp64([1025], 2, 1, 64, torch.float16)


@needs_triton
def test_llama_heads_d128():
    check_against_fp64([3, 40], 32, 8, 128, torch.float16, max_seqlen=64)


@needs_triton
@pytest.mark.parametrize("d", [32, 80, 96, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims(d, dtype):
    check_against_fp64([1, 18], 4, 2, d, dtype)


# ---------------------------------------------------------------------------------------------
# logit soft-capping (Gemma2)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("softcap", [1.0, 2.5, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_ragged_gqa(softcap, dtype):
    """Capped logits, forward and gradients, ragged lengths (1 included) and GQA; capping must
    change the result by far more than the error budget, or the test could not fail."""
    lengths, hq, hkv, d = [1, 37, 97], 4, 2, 64
    ref = check_against_fp64(lengths, hq, hkv, d, dtype, max_seqlen=128, softcap=softcap, q_gain=3.0)
    q, k, v = (t.detach().double() for t in make_qkv(lengths, hq, hkv, d, dtype))
    uncapped = attention_naive(q * 3.0, k, v, cu_from_lengths(lengths))
    assert (uncapped - ref).abs().max().item() > 0.05


@needs_triton
def test_softcap_with_scale_and_head_dim_256():
    """Gemma2 uses a custom scale (query_pre_attn_scalar**-0.5) and D=256."""
    check_against_fp64([5, 40], 2, 1, 256, torch.float32, softmax_scale=0.3, softcap=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_torch_reference(dtype):
    """The CPU runtime path (backend="torch") caps like the float64 ground truth and like the
    formula of transformers' Gemma2 eager attention (scale, then softcap * tanh(x / softcap))."""
    lengths, softcap, scale = [1, 9, 33], 1.5, 0.2
    q, k, v = make_qkv(lengths, 6, 2, 64, dtype, device="cpu")
    cu = cu_from_lengths(lengths, "cpu")
    out = flash_attn_varlen(q, k, v, cu, 33, softmax_scale=scale, softcap=softcap, backend="torch")
    exact = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_naive(*exact, cu, softmax_scale=scale, softcap=softcap)
    # float32: worst-case summation error for these sizes; float16: three units in the last place of
    # values near 1 (q, k, v ~ N(0, 1), the output is a convex mix of v rows)
    tol = accumulation_eps(ref, 64, 33) if dtype == torch.float32 else 3 * torch.finfo(torch.float16).eps
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    # the Gemma2 formula written out for the last sequence, head 0 (kv head 0)
    s = exact[0][10:43, 0] @ exact[1][10:43, 0].T * scale
    gemma2 = torch.softmax(torch.tanh(s / softcap) * softcap, -1) @ exact[2][10:43, 0]
    torch.testing.assert_close(ref[10:43, 0], gemma2)
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, exact, dout.double())):
        grad_tol = accumulation_eps(r, 64, 33) if dtype == torch.float32 else 10 * tol  # float16: gradients reach ~10
        torch.testing.assert_close(g.double(), r, atol=grad_tol, rtol=0)
    assert (ref - attention_naive(*exact, cu, softmax_scale=scale)).abs().max() > 1e-2


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf"), "2", True])
def test_bad_softcap_raises(softcap):
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_varlen(**_good(), softcap=softcap)


def test_softcap_zero_or_none_is_plain_attention():
    args = _good()
    plain = flash_attn_varlen(**args)
    assert torch.equal(flash_attn_varlen(**args, softcap=0.0), plain)
    assert torch.equal(flash_attn_varlen(**args, softcap=None), plain)


# ---------------------------------------------------------------------------------------------
# attention dropout
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dropout_p, dtype", [(0.17, torch.float32), (0.5, torch.float16), (0.9, torch.float32)])
def test_dropout_matches_reference_with_kernel_mask(dropout_p, dtype):
    """Forward and dq/dk/dv equal the reference's under the kernel's own mask (ragged, length 1, GQA,
    max_seqlen above the longest)."""
    check_against_fp64([1, 37, 97], 4, 2, 64, dtype, max_seqlen=100, seed=3, dropout_p=dropout_p)


@needs_triton
def test_dropout_with_softcap_and_head_dim_80():
    check_against_fp64([2, 33], 3, 1, 80, torch.float32, seed=5, dropout_p=0.3, softcap=2.0, q_gain=3.0)


@needs_triton
def test_dropout_seed_reproducible_and_calls_differ():
    lengths, p = [1, 20, 45], 0.3
    q, k, v = (t.detach() for t in make_qkv(lengths, 4, 2, 32, torch.float32))
    cu = cu_from_lengths(lengths)
    torch.manual_seed(7)
    first = flash_attn_varlen(q, k, v, cu, 45, dropout_p=p, backend="triton")
    second = flash_attn_varlen(q, k, v, cu, 45, dropout_p=p, backend="triton")  # the generator moved on
    torch.manual_seed(7)
    again = flash_attn_varlen(q, k, v, cu, 45, dropout_p=p, backend="triton")
    assert torch.equal(first, again)
    assert not torch.allclose(first, second)
    masks = [flash_attn_dropout_mask(cu, 4, 45, p, seed, 2**40) for seed in (2**33, 2**33 + 1)]
    masks.append(flash_attn_dropout_mask(cu, 4, 45, p, 2**33, 2**40 + 4 * 95 * 45))  # offset past the first
    valid = flash_attn_dropout_mask(cu, 4, 45, 0.0, 2**33, 2**40)  # p = 0 keeps exactly the valid entries
    assert valid.sum() == 4 * sum(n * n for n in lengths)
    for a, b in ((0, 1), (0, 2)):
        assert (masks[a] != masks[b]).float().sum() > 0.3 * valid.sum()
    assert torch.equal(flash_attn_dropout_mask(cu, 4, 45, p, 2**33, 2**40), masks[0])


@needs_triton
@pytest.mark.parametrize("dropout_p", [0.1, 0.3, 0.7])
def test_dropout_keep_rate_within_binomial_bound(dropout_p):
    lengths, n_heads = [1, 97, 200], 4
    cu = cu_from_lengths(lengths)
    mask = flash_attn_dropout_mask(cu, n_heads, 200, dropout_p, 2**35 + 11, 2**41)
    n = n_heads * sum(n * n for n in lengths)
    kept = mask.sum().item()
    sigma = (n * dropout_p * (1 - dropout_p)) ** 0.5
    assert abs(kept - n * (1 - dropout_p)) < 5 * sigma, (kept, n, dropout_p)
    # entries outside the block-diagonal are never "kept"
    valid = flash_attn_dropout_mask(cu, n_heads, 200, 0.0, 0, 0)
    assert not (mask & ~valid).any()
    # no structure across heads / rows: each head and the first and second half of the rows keep ~1-p
    for part in [(0,), (n_heads - 1,), (slice(None), slice(0, 149)), (slice(None), slice(149, None))]:
        rate = mask[part].sum().item() / valid[part].sum().item()
        assert abs(rate - (1 - dropout_p)) < 0.02, (part, rate)


def _dropout_mean_over_copies(backend, dtype, dropout_p, copies=64, calls=2):
    """Pack ``copies`` copies of one ragged batch in a single call (each copy draws its own mask),
    average them over ``calls`` calls; returns (mean, standard error, no-dropout output)."""
    lengths = [1, 6, 11]
    q, k, v = (t.detach() for t in make_qkv(lengths, 2, 1, 32, dtype, device=DEVICE if backend == "triton" else "cpu"))
    reps = [t.repeat(copies, 1, 1) for t in (q, k, v)]
    cu = cu_from_lengths(lengths * copies, q.device)
    torch.manual_seed(0)
    outs = torch.stack(
        [
            flash_attn_varlen(*reps, cu, 11, dropout_p=dropout_p, backend=backend).double().view(copies, sum(lengths), 2, 32)
            for _ in range(calls)
        ]
    ).flatten(0, 1)
    plain = flash_attn_varlen(q, k, v, cu_from_lengths(lengths, q.device), 11, backend=backend).double()
    return outs.mean(0), outs.std(0) / outs.shape[0] ** 0.5, plain


@pytest.mark.parametrize("backend, dropout_p", [("triton", 0.3), ("torch", 0.2), ("torch", 0.6)])
def test_dropout_is_unbiased(backend, dropout_p):
    """Averaged over many masks the output converges to the no-dropout output (the 1/(1-p) scaling)."""
    if backend == "triton" and _dispatch.triton_device() is None:
        pytest.skip("needs triton")
    mean, stderr, plain = _dropout_mean_over_copies(backend, torch.float32, dropout_p)
    z = (mean - plain).abs() / (stderr + 1e-6)
    # unbiased: |z| is half-normal (mean 0.8); a 1/(1-p) scaling error shows up as large z everywhere
    assert z.max() < 6 and z.mean() < 1.2, (z.max(), z.mean())
    assert stderr.mean() > 1e-3  # dropout really was on


@needs_triton
def test_dropout_p_zero_is_the_plain_kernel():
    q, k, v = make_qkv([1, 19, 40], 4, 2, 64, torch.float16)
    cu = cu_from_lengths([1, 19, 40])
    state = torch.get_rng_state()
    plain = flash_attn_varlen(q, k, v, cu, 40, backend="triton")
    zero = flash_attn_varlen(q, k, v, cu, 40, dropout_p=0.0, backend="triton")
    assert torch.equal(plain, zero)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(plain, (q, k, v), g), torch.autograd.grad(zero, (q, k, v), g)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dropout_p", [1.0, -0.1, 1.5, float("nan"), "0.1"])
def test_bad_dropout_p_raises(dropout_p):
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_varlen(**_good(), dropout_p=dropout_p)


@needs_triton
def test_softmax_scale_and_mha():
    check_against_fp64([5, 20], 2, 2, 32, torch.float32, softmax_scale=0.3)


@needs_triton
def test_strided_inputs():
    """q/k/v as slices of one packed qkv projection (token stride != H * D), and a q whose
    feature stride is not 1 (copied by the launcher, in the forward and again in the backward)."""
    lengths, hq, hkv, d = [6, 19], 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lengths), hq + 2 * hkv, 2 * d, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = qkv[:, :hq, ::2], qkv[:, hq : hq + hkv, :d], qkv[:, hq + hkv :, d:]
    cu = cu_from_lengths(lengths)
    out = flash_attn_varlen(q, k, v, cu, 19, backend="triton")
    (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    exact = qkv.detach().double().requires_grad_()
    ref = attention_naive(exact[:, :hq, ::2], exact[:, hq : hq + hkv, :d], exact[:, hq + hkv :, d:], cu)
    (grad_ref,) = torch.autograd.grad(ref, exact, torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, atol=accumulation_eps(ref, d, 19), rtol=0)
    torch.testing.assert_close(grad.double(), grad_ref, atol=accumulation_eps(grad_ref, d, 19), rtol=0)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 48), min_size=1, max_size=3),
    group=st.sampled_from([1, 2, 3]),
    hkv=st.integers(1, 2),
    d=st.sampled_from([32, 64, 80, 96]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    extra=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes(lengths, group, hkv, d, dtype, extra, seed):
    check_against_fp64(lengths, group * hkv, hkv, d, dtype, max_seqlen=max(lengths) + extra, seed=seed)


@needs_cuda
@pytest.mark.parametrize("d", SUPPORTED_HEAD_DIMS)
def test_bf16_gpu(d):
    check_against_fp64([1, 7, 97, 200, 1025], 8, 2, d, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_fp16_gpu_larger(d):
    check_against_fp64([1, 100, 513, 2048, 31], 32, 8, d, torch.float16)


# ---------------------------------------------------------------------------------------------
# the poison is real: an element no program writes stays NaN
# ---------------------------------------------------------------------------------------------


@needs_triton
def test_unwritten_outputs_are_nan():
    from llm2vec_fast.kernels import flash_attn_triton

    q, k, v = make_qkv([200], 2, 1, 32, torch.float32)
    cu = cu_from_lengths([200])
    with torch.no_grad():
        # max_seqlen=1 launches a single block per sequence, so rows past it are never written
        out, lse = flash_attn_triton.attention_forward(q, k, v, cu, 1, 0.2)
        assert out[0].isfinite().all() and out[-1].isnan().all() and lse[:, -1].isnan().all()
        out, lse = flash_attn_triton.attention_forward(q, k, v, cu, 200, 0.2)
        dq, dk, dv = flash_attn_triton.attention_backward(torch.ones_like(out), q, k, v, out, lse, cu, 1, 0.2)
        for g in (dq, dk, dv):
            assert g[0].isfinite().all() and g[-1].isnan().all()


@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_gpu_config_tables_keep_gpu_rules():
    """The GPU autotune tables (unused by the interpreter): powers of two, tl.dot dims >= 16, a config
    for every head-dim class, and a rough shared-memory bound under Hopper's ~227 KB (fp16/bf16)."""
    from llm2vec_fast.kernels import flash_attn_triton as fat

    # (table, rows resident in the program, rows streamed per stage): bytes ~ 2 * BLOCK_D * rows
    tables = {
        "fwd": (fat._FWD_TABLE, lambda m, n: m, lambda m, n: 2 * n),
        "dkdv": (fat._BWD_KV_TABLE, lambda m, n: 2 * n, lambda m, n: 2 * m),
        "dq": (fat._BWD_Q_TABLE, lambda m, n: 2 * m, lambda m, n: 2 * n),
    }
    for name, (table, resident, streamed) in tables.items():
        for bd, bm, bn, warps, stages in table:
            for x in (bm, bn, warps):
                assert x & (x - 1) == 0, (name, bm, bn, warps)
            assert bm >= 16 and bn >= 16, (name, bm, bn)
            smem = 2 * bd * (resident(bm, bn) + stages * streamed(bm, bn))
            assert smem <= 227 * 1024, (name, bd, bm, bn, stages, smem)
        configs = [fat.triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "MAX_BLOCK_D": bd}) for bd, bm, bn, _, _ in table]
        for block_d in (32, 64, 128, 256):
            kept = fat._prune_by_head_dim(configs, {"BLOCK_D": block_d})
            assert kept and all(c.kwargs["MAX_BLOCK_D"] >= block_d for c in kept), (name, block_d)


# ---------------------------------------------------------------------------------------------
# references and dispatch
# ---------------------------------------------------------------------------------------------


def test_torch_reference_matches_naive():
    lengths = [1, 9, 33]
    q, k, v = make_qkv(lengths, 6, 2, 64, torch.float32, device="cpu")
    cu = cu_from_lengths(lengths, "cpu")
    out = flash_attn_varlen(q, k, v, cu, 33, backend="torch")
    exact_inputs = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_naive(*exact_inputs, cu)
    torch.testing.assert_close(out.double(), ref, atol=accumulation_eps(ref, 64, 33), rtol=0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for g, r in zip(grads, torch.autograd.grad(ref, exact_inputs, dout.double())):
        torch.testing.assert_close(g.double(), r, atol=accumulation_eps(r, 64, 33), rtol=0)


def test_auto_backend_on_cpu_never_uses_triton(monkeypatch):
    def fail():
        raise AssertionError("the Triton path ran on CPU tensors with backend='auto'")

    monkeypatch.setattr(flash_attn_module, "_triton_ops", fail)
    q, k, v = make_qkv([4, 6], 4, 2, 32, torch.float32, device="cpu")
    cu = cu_from_lengths([4, 6], "cpu")
    out = flash_attn_varlen(q, k, v, cu, 6)
    torch.testing.assert_close(out, flash_attn_varlen_reference(q, k, v, cu, 6))
    out.sum().backward()


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv([4], 2, 1, 32, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        flash_attn_varlen(q, k, v, cu_from_lengths([4], "cpu"), 4, backend="triton")


def test_imports_and_runs_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        from llm2vec_fast.kernels import flash_attn_varlen, masked_pool
        q = torch.randn(5, 2, 32)
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        assert flash_attn_varlen(q, q[:, :1], q[:, :1], cu, 3).shape == (5, 2, 32)
        assert masked_pool(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), "mean").shape == (2, 4)
        try:
            flash_attn_varlen(q, q, q, cu, 3, backend="triton")
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("backend='triton' without triton should fail")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------


def _good():
    q, k, v = (t.detach() for t in make_qkv([3, 5], 4, 2, 32, torch.float32, device="cpu"))
    return dict(q=q, k=k, v=v, cu_seqlens=cu_from_lengths([3, 5], "cpu"), max_seqlen=5)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: dict(q=a["q"][0]), "3-D"),
        (lambda a: dict(k=a["k"][None]), "3-D"),
        (lambda a: dict(v=a["v"][:, :1]), "same shape"),
        (lambda a: dict(k=a["k"][:7], v=a["v"][:7]), "agree on T"),
        (lambda a: dict(k=a["k"][:, :1].expand(8, 3, 32), v=a["v"][:, :1].expand(8, 3, 32)), "multiple"),
        (lambda a: dict(q=torch.zeros(8, 4, 48), k=torch.zeros(8, 2, 48), v=torch.zeros(8, 2, 48)), "head dim"),
        (lambda a: dict(k=a["k"].half()), "share a dtype"),
        (lambda a: dict(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), "not supported"),
        (lambda a: dict(cu_seqlens=a["cu_seqlens"].long()), "int32"),
        (lambda a: dict(cu_seqlens=a["cu_seqlens"][None]), "1-D"),
        (lambda a: dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), "start at 0"),
        (lambda a: dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "must equal"),
        (lambda a: dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), "non-decreasing"),
        (lambda a: dict(max_seqlen=4), "smaller than the longest"),
        (lambda a: dict(max_seqlen=5.0), "must be an int"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    args = _good()
    args.update(change(args))
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen(**args)


def test_cu_seqlens_modified_in_place_is_checked_again():
    args = _good()
    flash_attn_varlen(**args)  # validated (and remembered)
    args["cu_seqlens"][1] = 9  # now decreasing: the cached check must not be reused
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attn_varlen(**args)
    with torch.inference_mode():  # inference tensors have no version counter
        args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in _good().items()}
        assert flash_attn_varlen(**args).shape == args["q"].shape
        assert flash_attn_varlen(**args).shape == args["q"].shape


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        flash_attn_varlen(**_good(), backend="cuda")
