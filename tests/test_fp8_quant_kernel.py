"""Row-wise FP8 quantization (``llm2vec_fast.kernels.fp8_quantize_rows``): the Triton kernel gives
the torch reference's bits (scales and e4m3 values), every row and column written, on the widths of
real models; the reference against the e4m3 grid itself; the custom op's registration.

On CPU the kernel runs under the Triton interpreter, whose float32 -> e4m3 cast is wrong next to
powers of two; there the kernel stores the clamped float32 values and torch casts them (see
``kernels/fp8_quant_triton.py``), so the cast itself is checked on a GPU (``test_gpu_*``)."""

from __future__ import annotations

import pytest
import torch
from llm2vec_fast.kernels import _dispatch, fp8_quantize_rows, fp8_quantize_rows_reference
from llm2vec_fast.kernels.fp8_quant_reference import FP8_DTYPE, FP8_MAX, MIN_SCALE
from tolerances import assert_fp8_rows_close

DEVICE = _dispatch.triton_device()
needs_triton = pytest.mark.skipif(DEVICE is None, reason="needs a GPU or TRITON_INTERPRET=1")


def _activations(rows: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows seven decades apart, an attention-sink row, an all-zero row, values next to powers of two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * torch.logspace(-3, 4, rows).unsqueeze(1)
    x[0, :4] = torch.tensor([31.9, -63.8, 127.6, 448.0])  # scale 1: each rounds up across a binade
    if rows > 2:
        x[1] = 0.0
        x[2, 1] = 3e4  # one outlier sets only its own row's scale
    return x.to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize(("rows", "d"), [(1, 16), (7, 64), (33, 576), (5, 1536), (3, 4096), (2, 14336), (70, 80)])
def test_kernel_gives_the_reference_bits(dtype, rows, d):
    x = _activations(rows, d, dtype).to(DEVICE)
    with _dispatch.poisoned_outputs():
        q, scales = fp8_quantize_rows(x, backend="triton")
    ref_q, ref_scales = fp8_quantize_rows_reference(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scales.shape == (rows, 1) and scales.dtype == torch.float32
    assert torch.equal(scales, ref_scales)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@needs_triton
def test_kernel_takes_strided_rows_and_leading_dims():
    x = _activations(12, 128, torch.float32).to(DEVICE)
    wide = torch.cat([x, x], dim=1)[:, :128]  # row stride 256
    q, scales = fp8_quantize_rows(wide, backend="triton")
    ref_q, ref_scales = fp8_quantize_rows_reference(x)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scales, ref_scales)
    q3, scales3 = fp8_quantize_rows(x.reshape(3, 4, 128), backend="triton")
    assert q3.shape == (3, 4, 128) and scales3.shape == (3, 4, 1)
    assert torch.equal(q3.reshape(12, 128).view(torch.uint8), ref_q.view(torch.uint8))
    empty_q, empty_scales = fp8_quantize_rows(x[:0], backend="triton")
    assert empty_q.shape == (0, 128) and empty_scales.shape == (0, 1)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize(("rows", "d"), [(37, 48), (5, 1536), (2, 8192), (1, 14336)])
def test_silu_mul_kernel_matches_silu_then_quantize(dtype, rows, d):
    """SwiGLU then FP8 in one kernel against ``F.silu(gate) * up`` quantized by the reference."""
    from llm2vec_fast.kernels import FP8Rows, silu_mul_fp8

    g = torch.Generator().manual_seed(d)
    gate_up = (torch.randn(rows, 2 * d, generator=g) * 3).to(DEVICE, dtype)
    with _dispatch.poisoned_outputs():
        got = silu_mul_fp8(gate_up, backend="triton")
    gate, up = gate_up.chunk(2, dim=-1)
    ref = fp8_quantize_rows(torch.nn.functional.silu(gate) * up, backend="torch")
    assert isinstance(got, FP8Rows) and got.shape == (rows, d) and got.scales.shape == (rows, 1)
    torch_ref = silu_mul_fp8(gate_up, backend="torch")
    assert torch.equal(torch_ref.values.view(torch.uint8), ref.values.view(torch.uint8))
    assert_fp8_rows_close(got, ref, 0.99)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_kernels_keep_nan_and_inf_as_torch_does(dtype):
    """An overflowed (inf) or NaN row comes out as torch's: a NaN or inf scale and NaN values, never
    finite saturated ones (Triton's default max and clamp drop NaN: +inf became -448 and a NaN row got
    a finite scale). Compared NaN-aware: the sign of a NaN is not specified."""
    from llm2vec_fast.kernels import rms_norm_fp8, silu_mul_fp8

    finite = torch.tensor([1.0, 2.0, -3.0, 0.5] * 8)
    rows = torch.stack([finite, finite.clone(), finite.clone(), finite.clone()])
    rows[0, 0], rows[1, 3], rows[2, 5] = float("inf"), float("nan"), float("-inf")
    x = rows.to(DEVICE, dtype)

    def check(got, ref):
        torch.testing.assert_close(got.scales, ref.scales, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got.values.float(), ref.values.float(), rtol=0, atol=0, equal_nan=True)

    check(fp8_quantize_rows(x, backend="triton"), fp8_quantize_rows(x, backend="torch"))
    reference = fp8_quantize_rows(x, backend="torch")
    assert reference.scales[:3].isfinite().logical_not().all() and reference.scales[3].isfinite().all()
    gate_up = torch.cat([x.flip(0), x], dim=1)  # inf / NaN in gate for some rows, in up for others
    check(silu_mul_fp8(gate_up, backend="triton"), silu_mul_fp8(gate_up, backend="torch"))
    weight = torch.ones(x.shape[1], device=DEVICE, dtype=dtype)
    check(rms_norm_fp8(x, weight, 1e-6, backend="triton"), rms_norm_fp8(x, weight, 1e-6, backend="torch"))


def test_silu_mul_rejects_bad_input():
    from llm2vec_fast.kernels import silu_mul_fp8

    with pytest.raises(ValueError, match="even size"):
        silu_mul_fp8(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="dtype torch.int32"):
        silu_mul_fp8(torch.zeros(2, 8, dtype=torch.int32))
    q = silu_mul_fp8(torch.zeros(3, 4, 8))
    assert q.shape == (3, 4, 4) and q.scales.shape == (3, 4, 1)
    if DEVICE is not None:  # halves wider than the kernel's rows (Llama-70B's MLP: 28672): refused, or the reference
        with pytest.raises(ValueError, match="rows of up to 16384 columns"):
            silu_mul_fp8(torch.zeros(1, 2 * 16385, device=DEVICE), backend="triton")
        assert silu_mul_fp8(torch.zeros(1, 2 * 16385, device=DEVICE)).shape == (1, 16385)
    torch.library.opcheck(
        torch.ops.llm2vec_fast.silu_mul_fp8.default, (torch.randn(5, 16), "torch"), test_utils=("test_schema", "test_faketensor")
    )


def test_reference_rounds_to_the_nearest_e4m3_value():
    x = _activations(24, 64, torch.float32)
    q, scales = fp8_quantize_rows_reference(x)
    assert torch.equal(scales[1], torch.tensor([MIN_SCALE])) and torch.equal(q[1].float(), torch.zeros(64))
    nonzero = scales[:, 0] > MIN_SCALE
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((int(nonzero.sum()),), FP8_MAX))
    grid = torch.unique(torch.arange(256, dtype=torch.int16).to(torch.uint8).view(FP8_DTYPE).float())
    grid = grid[torch.isfinite(grid)]
    scaled = x / scales
    nearest = (scaled.reshape(-1, 1) - grid).abs().min(dim=1).values.reshape(scaled.shape)
    assert torch.all((q.float() - scaled).abs() <= nearest * (1 + 1e-6) + 1e-12)
    assert scales[0, 0] == 1.0 and q[0, :4].float().tolist() == [32.0, -64.0, 128.0, 448.0]


def test_auto_backend_and_bad_input():
    x = _activations(4, 32, torch.float32)
    q, scales = fp8_quantize_rows(x)  # CPU tensors: the reference
    ref_q, ref_scales = fp8_quantize_rows_reference(x)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scales, ref_scales)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        fp8_quantize_rows(x.double())
    for empty in (torch.tensor(1.0), torch.zeros(2, 0)):
        with pytest.raises(ValueError, match="at least one dimension, the last one non-empty"):
            fp8_quantize_rows(empty)
    with pytest.raises(ValueError, match="unknown backend"):
        fp8_quantize_rows(x, backend="cuda")
    if DEVICE is not None:
        with pytest.raises(ValueError, match="rows of up to 16384 columns"):
            fp8_quantize_rows(torch.zeros(1, 16385, device=DEVICE), backend="triton")
        wide = torch.zeros(1, 16385, device=DEVICE)
        assert fp8_quantize_rows(wide)[0].shape == (1, 16385)  # auto: the reference


def test_op_passes_opcheck():
    """Schema and fake implementation of ``llm2vec_fast::fp8_quantize_rows`` (what ``torch.compile``
    relies on), on the torch backend."""
    x = _activations(6, 32, torch.float32)
    torch.library.opcheck(torch.ops.llm2vec_fast.fp8_quantize_rows.default, (x, "torch"), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(DEVICE != "cuda", reason="the in-kernel e4m3 cast runs only on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_cast_gives_the_reference_bits(dtype):
    """The e4m3 cast in the kernel (round to nearest even, as torch's) on every value range."""
    x = _activations(257, 4096, dtype, seed=3).cuda()
    q, scales = fp8_quantize_rows(x, backend="triton")
    ref_q, ref_scales = fp8_quantize_rows_reference(x)
    assert torch.equal(scales, ref_scales) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 and the in-kernel e4m3 cast run only on a GPU")
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_rms_norm_fp8_bf16(with_residual):
    """bf16 norm-and-quantize on the card against the norm then the quantization in torch."""
    from llm2vec_fast.kernels import FP8Rows, rms_norm, rms_norm_fp8

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(300, 2048, generator=g) * 3).to("cuda", torch.bfloat16)
    residual = torch.randn(300, 2048, generator=g).to("cuda", torch.bfloat16) if with_residual else None
    weight = (torch.rand(2048, generator=g) + 0.5).to("cuda", torch.bfloat16)
    got = rms_norm_fp8(x, weight, 1e-6, residual=residual, backend="triton")
    normed = rms_norm(x, weight, 1e-6, residual=residual, backend="triton")
    if with_residual:
        (got, got_sum), (normed, normed_sum) = got, normed
        assert torch.equal(got_sum, normed_sum)
    ref_q, ref_scales = fp8_quantize_rows_reference(normed)  # the norm kernel's output, quantized in torch
    # the same norm code compiled into another kernel: equal bits, or (contracted differently) rarely a neighbour
    assert_fp8_rows_close(got, FP8Rows(ref_q, ref_scales), 0.999)
