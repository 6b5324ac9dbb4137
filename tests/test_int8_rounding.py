"""The int8 export's rounding in torch (``export/int8_rounding.py``), shared by the graph, the
simulation, GPTQ and quantization-aware training: the same integers as the export's numpy rounding
had before it moved there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llm2vec_fast.export.int8_rounding import ROW_ACTIVATION_LEVELS, fake_int8_rows, fake_int8_weight, round_to_levels


def numpy_reference(w: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_columns`` as the export wrote it in numpy (``w`` ``[K, N]``, one scale per column)."""
    scale = np.abs(w).max(axis=0).astype(np.float64) / levels
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(w / scale), -levels, levels).astype(np.int8)
    return q, scale.astype(np.float32)


def awkward_weights(dtype, levels: int) -> np.ndarray:
    """``[K, N]``: columns of very different ranges, a zero column and one of exact half steps
    (its maximum is ``levels``, so its scale is 1 and half its quotients are ties)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 40)) * rng.exponential(1, 40)).astype(dtype)
    w[:, 3] = 0
    w[:, 5] = (np.arange(300) % (2 * levels + 1) - levels) / 2
    w[0, 5] = levels
    return w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [63, 127])
def test_round_to_levels_gives_the_numpy_integers(levels, dtype):
    w = awkward_weights(dtype, levels)
    expected_q, expected_scale = numpy_reference(w, levels)
    q, scale = round_to_levels(torch.from_numpy(w).T, levels)  # torch takes [out, in]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    np.testing.assert_array_equal(q.numpy().T, expected_q)
    np.testing.assert_array_equal(scale.numpy(), expected_scale)
    assert int(q.abs().max()) == levels
    ties = w[:, 5] == 2.5
    assert ties.any() and set(q[5, torch.from_numpy(ties)].tolist()) == {2}  # half to even, as np.rint and QuantizeLinear


@pytest.mark.parametrize("levels", [63, 127])
def test_quantize_columns_is_round_to_levels(levels):
    pytest.importorskip("onnx")
    from llm2vec_fast.export.quantize import quantize_columns

    w = awkward_weights(np.float32, levels)
    q, scale = quantize_columns(w, levels)
    expected_q, expected_scale = numpy_reference(w, levels)
    assert q.flags.c_contiguous
    np.testing.assert_array_equal(q, expected_q)
    np.testing.assert_array_equal(scale, expected_scale)


def test_fake_weight_and_rows_sit_on_their_grids():
    w = torch.from_numpy(awkward_weights(np.float32, 63)).T.contiguous()
    fake = fake_int8_weight(w, 63)
    q, scale = round_to_levels(w, 63)
    assert fake.dtype == w.dtype
    torch.testing.assert_close(fake, q.float() * scale[:, None], rtol=0, atol=0)
    assert torch.all((fake - w).abs() <= scale[:, None] / 2 * (1 + 1e-6))
    x = torch.randn(3, 7, 16) * torch.tensor([1.0, 100.0, 1e-3])[:, None, None]
    rounded = fake_int8_rows(x)
    step = x.abs().amax(-1, keepdim=True) / ROW_ACTIVATION_LEVELS
    codes = rounded / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # integers per row
    assert torch.all((rounded - x).abs() <= step / 2 * (1 + 1e-5))
