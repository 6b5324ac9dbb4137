"""SmoothQuant folding for the int8 export (export/smoothing.py): exact in fp32 on every supported
family, flatter activations where it matters, a clear error elsewhere, and what the export records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MIXED_TEXTS, tiny_config
from llm2vec_fast.export.calibrate import Int8Simulator, cosine_rows
from llm2vec_fast.export.smoothing import SmoothingNotSupportedError, input_channel_maxima, smoothed_copy

from llm2vec_fast import LLM2Vec

TEXTS = MIXED_TEXTS


def _encoder(family: str, tokenizer, outliers: bool = True, **overrides) -> LLM2Vec:
    """A tiny random bidirectional encoder; ``outliers`` gives a few residual channels a large norm
    gain, as trained LLMs have (so the scales are far from 1)."""
    from transformers import AutoModel

    from llm2vec_fast.bidirectional import enable_bidirectional

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(family, **overrides), attn_implementation="sdpa").eval()
    if outliers:
        with torch.no_grad():
            for layer in model.layers:
                layer.input_layernorm.weight[[3, 17]] = 40.0
                layer.post_attention_layernorm.weight[[5]] = 30.0
    return LLM2Vec(enable_bidirectional(model), tokenizer, max_length=64).eval()


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),  # v_proj / up_proj biases are divided too
        ("mistral", {}),
        ("qwen2", {}),  # q/k/v biases
        ("qwen3", {}),  # q/k norms after the projections
        ("llama", {"num_key_value_heads": 4}),  # no grouped-query attention
    ],
    ids=["llama", "llama-biases", "mistral", "qwen2", "qwen3", "llama-mha"],
)
def test_smoothing_is_exact_in_fp32_and_leaves_the_encoder_alone(family, overrides, smollm_tokenizer):
    encoder = _encoder(family, smollm_tokenizer, **overrides)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    reference = encoder.encode(TEXTS, convert_to_numpy=True)
    smoothed = smoothed_copy(encoder, TEXTS, alpha=0.5)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    got = smoothed.encode(TEXTS, convert_to_numpy=True)
    assert cosine_rows(got, reference).min() >= 0.99999
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    changed = {k.split(".")[-2] for k, v in smoothed.state_dict().items() if not torch.equal(before[k], v)}
    # every folded place moved: both norms, and all seven projections
    assert {
        "input_layernorm",
        "post_attention_layernorm",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    } <= changed


def test_smoothing_flattens_the_activations_int8_rounds(smollm_tokenizer):
    """With outlier channels, per-token int8 activations lose the small channels; after smoothing the
    same scheme on every layer is several times closer to fp32."""
    encoder = _encoder("llama", smollm_tokenizer)
    smoothed = smoothed_copy(encoder, TEXTS, alpha=0.5)

    def spread(enc):  # largest / median input-channel maximum of the q/k/v inputs
        m = input_channel_maxima(enc, TEXTS)
        return max(float(layer["qkv"].max() / layer["qkv"].median()) for layer in m)

    assert spread(smoothed) < spread(encoder) / 4

    def int8_activation_error(enc):
        sim = Int8Simulator(enc)
        ref = sim.embed(set(), TEXTS)
        return float((1 - cosine_rows(sim.embed(set(sim.modules), TEXTS, weights=False), ref)).max())

    assert int8_activation_error(smoothed) < int8_activation_error(encoder) / 3


def test_smoothing_refuses_other_families_and_bad_alphas(smollm_tokenizer):
    gemma = _encoder("gemma", smollm_tokenizer, outliers=False)
    with pytest.raises(SmoothingNotSupportedError, match="llama, mistral, qwen2, qwen3; this model is 'gemma'"):
        smoothed_copy(gemma, TEXTS)
    llama = _encoder("llama", smollm_tokenizer, outliers=False)
    for alpha in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="alpha"):
            smoothed_copy(llama, TEXTS, alpha=alpha)


def test_int8_options_smoothing_values():
    from llm2vec_fast.export import Int8Options

    assert Int8Options().smoothing == "auto"
    Int8Options(smoothing=0)
    Int8Options(smoothing=0.8)
    for bad in (1.0, -0.1, "yes"):
        with pytest.raises(ValueError, match="smoothing"):
            Int8Options(smoothing=bad)


def test_export_records_smoothing_and_skips_it_where_unsupported(smollm_tokenizer, tmp_path):
    from llm2vec_fast.export import Int8Options, ValidationConfig, export_onnx

    no_stsb = ValidationConfig(stsb_pairs=0)
    llama = _encoder("llama", smollm_tokenizer, outliers=False)
    report = json.loads((export_onnx(llama, tmp_path / "on", precision="int8", validate=no_stsb) / "export_report.json").read_text())
    assert report["status"] == "ok" and report["quantization"]["smoothing"] == {"alpha": 0.5, "inputs": 96}
    off = export_onnx(llama, tmp_path / "off", precision="int8", validate=no_stsb, int8=Int8Options(smoothing=0))
    assert json.loads((off / "export_report.json").read_text())["quantization"]["smoothing"] == {"alpha": None}

    gemma = _encoder("gemma", smollm_tokenizer, outliers=False)
    folder = export_onnx(gemma, tmp_path / "gemma", precision="int8", validate=no_stsb)
    assert json.loads((folder / "export_report.json").read_text())["quantization"]["smoothing"] == {
        "alpha": None,
        "skipped": "not supported for gemma",
    }
    with pytest.raises(SmoothingNotSupportedError):
        export_onnx(gemma, tmp_path / "gemma-forced", precision="int8", validate=no_stsb, int8=Int8Options(smoothing=0.5))


def test_cli_int8_smooth_option():
    import argparse

    from llm2vec_fast.cli.export import _smoothing

    assert _smoothing("auto") == "auto" and _smoothing("0") == 0.0 and _smoothing("0.6") == 0.6
    for bad in ("1", "-0.2", "strong"):
        with pytest.raises(argparse.ArgumentTypeError):
            _smoothing(bad)
