"""FLOP/byte accounting, card peaks and the kernel table of ``llm2vec_fast.profiling``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from llm2vec_fast.profiling import (
    KernelRow,
    Work,
    attention_flops,
    card_peak,
    category_rates,
    decoder_linear_params,
    encode_flops,
    kernel_rows,
    pooling_bytes,
    render_kernel_table,
)


def test_attention_flops_counts_useful_pairs_only():
    assert attention_flops([3, 5], num_heads=2, head_dim=4) == 4 * (9 + 25) * 2 * 4
    assert attention_flops([3, 5], 2, 4, num_layers=10) == 10 * attention_flops([3, 5], 2, 4)


def test_encode_flops_by_hand_on_a_tiny_config():
    # hidden 8, 2 query heads and 1 KV head of dim 4, MLP 16, 3 layers
    config = SimpleNamespace(
        hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16, num_hidden_layers=3
    )
    # q 8x8, k 8x4, v 8x4, o 8x8 = 192; gate, up, down 8x16 each = 384
    assert decoder_linear_params(config) == 192 + 384
    # 2 FLOPs per weight per token per layer (5 tokens, 3 layers) + attention 4 * L^2 * 2 heads * 4 per layer
    gemm = 2 * 576 * 5 * 3
    attention = 4 * (2 * 2 + 3 * 3) * 2 * 4 * 3
    assert encode_flops(config, [2, 3]) == gemm + attention
    # head_dim absent from the config: hidden / heads; no num_key_value_heads: multi-head attention
    plain = SimpleNamespace(hidden_size=8, num_attention_heads=2, intermediate_size=16, num_hidden_layers=1)
    assert decoder_linear_params(plain) == 4 * 64 + 384


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_decoder_linear_params_match_the_model(family):
    """The count from the config equals the weights of the nn.Linear modules of a real decoder layer."""
    from conftest import tiny_config
    from transformers import AutoModel

    config = tiny_config(family)
    layer = AutoModel.from_config(config).layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_linear_params(config) == weights


@pytest.mark.parametrize("mode, rows_read", [("mean", 100), ("weighted_mean", 100), ("last", 4), ("first", 4)])
def test_pooling_bytes(mode, rows_read):
    # hidden rows read + 1-byte mask per token + [B, D] output
    assert pooling_bytes(100, 4, 8, 2, mode) == rows_read * 8 * 2 + 100 + 4 * 8 * 2


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ],
)
def test_card_peak_by_device_name(name, expected):
    assert card_peak(name).name == expected


def test_unknown_cards_and_cpu_have_no_peak():
    assert card_peak("NVIDIA GeForce RTX 4090") is None
    assert card_peak(None) is None


def _event(name, device, time_us, parent=None, eid=0, linked=0):
    return SimpleNamespace(
        name=name,
        device_type=device,
        cpu_parent=parent,
        id=eid,
        linked_correlation_id=linked,
        self_cpu_time_total=time_us,
        time_range=SimpleNamespace(elapsed_us=lambda: time_us),
        is_user_annotation=False,
    )


def test_kernel_rows_classify_by_name_and_launching_op():
    sdpa = _event("aten::scaled_dot_product_attention", DeviceType.CPU, 1.0, eid=7)
    bmm = _event("aten::bmm", DeviceType.CPU, 1.0, parent=sdpa, eid=8)
    events = [
        sdpa,
        bmm,
        _event("_attn_fwd_kernel", DeviceType.CUDA, 300.0),
        _event("_attn_fwd_kernel", DeviceType.CUDA, 100.0),
        _event("ampere_bf16_gemm", DeviceType.CUDA, 500.0, linked=8),  # launched inside SDPA -> attention
        _event("ampere_bf16_gemm", DeviceType.CUDA, 900.0),
        _event("_pool_chunk_kernel", DeviceType.CUDA, 50.0),
        _event("_pool_combine_kernel", DeviceType.CUDA, 5.0),
    ]
    rows = kernel_rows(events, on_device=True)
    assert [(r.name, r.category, r.time_us, r.calls) for r in rows] == [
        ("ampere_bf16_gemm", "", 900.0, 1),
        ("ampere_bf16_gemm", "attention", 500.0, 1),
        ("_attn_fwd_kernel", "attention", 400.0, 2),
        ("_pool_chunk_kernel", "pooling", 50.0, 1),
        ("_pool_combine_kernel", "pooling", 5.0, 1),
    ]
    cpu_rows = kernel_rows(events, on_device=False)
    assert {(r.name, r.category) for r in cpu_rows} == {("aten::scaled_dot_product_attention", "attention"), ("aten::bmm", "attention")}


def test_category_rates_and_table_against_a_peak():
    rows = [
        KernelRow("_attn_fwd_kernel", "attention", 1000.0, 4),
        KernelRow("gemm", "", 3000.0, 8),
        KernelRow("_pool_chunk_kernel", "pooling", 10.0, 1),
    ]
    work = Work(attention_flops=4.945e11, pooling_bytes=3.35e7, dtype=torch.bfloat16)
    peak = card_peak("NVIDIA H100 80GB HBM3")
    rates = category_rates(rows, work, peak)
    assert rates["attention"]["rate"] == pytest.approx(494.5)  # TFLOP/s over 1 ms
    assert rates["attention"]["of_peak"] == pytest.approx(0.5)
    assert rates["pooling"]["rate"] == pytest.approx(3350.0)  # GB/s over 10 us
    assert rates["pooling"]["of_peak"] == pytest.approx(1.0)
    table = render_kernel_table(rows, work, peak, top=2)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["kernel", "kind"]
    assert lines[2].startswith("gemm") and "74.8%" in lines[2]
    assert "494.5 TFLOP/s" in lines[3] and "50.0%" in lines[3]
    assert lines[4].startswith("(1 more)")
    assert "H100 SXM" in table
    cpu = render_kernel_table(rows, Work(1e9, 1e6, torch.float32), None, top=5)
    assert "n/a" in cpu.splitlines()[3]
