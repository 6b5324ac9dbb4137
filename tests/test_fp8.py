"""FP8 W8A8 encoding (``llm2vec_fast.fp8``): the scales and rounding shared by the GPU path and its
CPU simulation, the simulated encoder's error on tiny Llama and Qwen2 models, layer selection, and
the errors without an FP8 GPU. The GPU test (``_scaled_mm`` against the simulation) needs sm_89+."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from llm2vec_fast import LLM2Vec
from llm2vec_fast.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    FP8Linear,
    FP8UnsupportedError,
    apply_fp8,
    calibrate_fp8_layers,
    e4m3_grid,
    fake_fp8_rows,
    fake_fp8_weight,
    fp8_simulator,
    fp8_unsupported_reason,
    gptq_fp8_weights,
    quantize_rows,
)
from llm2vec_fast.gptq import gptq_round
from llm2vec_fast.layer_sensitivity import cosine_rows

TEXTS = [
    "A man is playing a guitar.",
    "Two dogs run through the snow.",
    ["Find a paraphrase of the given sentence", "The market fell sharply on Monday."],
    "How do I reset my password?",
]
#: e4m3 keeps 3 mantissa bits: round to nearest moves a value by at most 2**-4 of itself (normal range)
E4M3_HALF_STEP = 2.0**-4


def _e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value, sorted (from the 256 bit patterns)."""
    values = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(FP8_DTYPE).float()
    return torch.unique(values[torch.isfinite(values)])


def test_weight_quantization_rounds_each_channel_to_the_nearest_e4m3_value():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen) * torch.logspace(-4, 3, 48).unsqueeze(1)  # rows 7 decades apart
    w[5] = 0.0  # an all-zero channel
    w[7, 3] = 1e4  # one outlier sets only its own row's scale
    q, scales = quantize_rows(w)
    assert q.dtype == FP8_DTYPE and scales.shape == (48, 1) and scales.dtype == torch.float32
    nonzero = torch.arange(48) != 5
    # amax / 448: the largest magnitude of every channel lands exactly on 448
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((47,), FP8_MAX))
    assert torch.equal(q[5].float(), torch.zeros(64))
    # each scaled weight is rounded to its nearest e4m3 value (a tie either way is fine)
    scaled = w / scales
    grid = _e4m3_grid()
    nearest = (scaled.reshape(-1, 1) - grid).abs().min(dim=1).values.reshape(scaled.shape)
    error = (q.float() - scaled).abs()
    assert torch.all(error <= nearest * (1 + 1e-6) + 1e-12)
    # within half a step of the grid: 2**-4 relative for normal values, half the subnormal step (2**-10) below
    normal = scaled.abs() >= 2.0**-6
    assert torch.all(error[normal] <= E4M3_HALF_STEP * scaled.abs()[normal] * (1 + 1e-6))
    assert torch.all(error[~normal] <= 2.0**-10 + 1e-12)
    # the layer multiplies by exactly these values
    layer = FP8Linear.from_linear(nn.Linear(64, 48, bias=False).requires_grad_(False), simulate=True)
    layer.weight_fp8.copy_(q)
    layer.weight_scales.copy_(scales.t())
    torch.testing.assert_close(layer.dequantized_weight(), q.float() * scales, rtol=0, atol=0)
    torch.testing.assert_close(fake_fp8_weight(w), q.float() * scales, rtol=0, atol=0)


def test_activations_get_one_scale_per_token():
    """An outlier token (attention sinks reach thousands) does not coarsen the other tokens."""
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    x[1, 0] = 5000.0
    fake = fake_fp8_rows(x)
    relative = ((fake - x).norm(dim=1) / x.norm(dim=1))[[0, 2]]
    assert torch.all(relative < E4M3_HALF_STEP)
    assert fake.shape == x.shape and fake.dtype == x.dtype
    assert torch.equal(fake_fp8_rows(x.reshape(1, 3, 32)), fake.reshape(1, 3, 32))  # [..., cols]: per row


@pytest.mark.parametrize("bias", [False, True])
def test_simulated_layer_is_the_product_of_the_quantized_operands(bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=bias).requires_grad_(False)
    x = torch.randn(2, 5, 64)
    layer = FP8Linear.from_linear(linear, simulate=True)
    y = layer(x)
    expected = fake_fp8_rows(x) @ fake_fp8_weight(linear.weight).t() + (linear.bias if bias else 0)
    assert y.shape == (2, 5, 32)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # against the exact layer: both operands rounded with relative error <= 2**-4, independently
    exact = linear(x)
    fp8_error = ((y - exact).norm() / exact.norm()).item()
    bf16_error = ((linear.bfloat16()(x.bfloat16()).float() - exact).norm() / exact.norm()).item()
    assert bf16_error < fp8_error < E4M3_HALF_STEP


def test_gptq_on_the_e4m3_grid_without_correlations_is_round_to_nearest():
    """A diagonal H moves no error between columns: GPTQ then picks each weight's nearest e4m3 value,
    on the same per-channel scales; with correlated inputs it picks other values, and the layer's
    output on those inputs gets closer."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=gen) * torch.logspace(-2, 2, 24).unsqueeze(1)
    q, scales = quantize_rows(w)
    values, scale = gptq_round(w, torch.diag(torch.rand(64, generator=gen) + 0.5), e4m3_grid())
    torch.testing.assert_close(scale, scales[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(values, q.float(), rtol=0, atol=0)
    x = torch.randn(256, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.1 * torch.randn(256, 64, generator=gen)
    values, scale = gptq_round(w, (x.T @ x).double(), e4m3_grid())
    assert torch.equal(values.to(FP8_DTYPE).float(), values)  # still e4m3 values
    assert not torch.equal(values, q.float())
    out = x @ w.T
    error = lambda v: ((x @ (v * scale[:, None]).T - out).norm() / out.norm()).item()  # noqa: E731
    assert error(values) < 0.7 * error(q.float())


def _tiny_encoder(family: str, smollm_tokenizer) -> LLM2Vec:
    from transformers import AutoModel

    from llm2vec_fast.bidirectional import enable_bidirectional

    torch.manual_seed(0)
    attention = "eager" if family == "gemma2" else "sdpa"  # transformers has no SDPA path for Gemma2's soft-capping
    model = AutoModel.from_config(tiny_config(family), attn_implementation=attention).eval()
    return LLM2Vec(enable_bidirectional(model), smollm_tokenizer, max_length=64).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_simulated_fp8_encoder_is_close_to_fp32(family, smollm_tokenizer):
    encoder = _tiny_encoder(family, smollm_tokenizer)
    fp32 = encoder.encode(TEXTS, convert_to_numpy=True)
    bf16 = copy.deepcopy(encoder).to(torch.bfloat16).encode(TEXTS, convert_to_numpy=True)
    report = apply_fp8(encoder, "fp8-simulated", high_precision_layers=[], rounding="nearest")
    assert report == {"scheme": "fp8-simulated", "rounding": "nearest", "high_precision_layers": [], "fp8_linears": 14, "linears": 14}
    assert encoder.quantization == "fp8-simulated"
    assert sum(isinstance(m, FP8Linear) for m in encoder.model.modules()) == 14
    fp8 = encoder.encode(TEXTS, convert_to_numpy=True)
    fp8_cos, bf16_cos = cosine_rows(fp8, fp32), cosine_rows(bf16, fp32)
    assert fp8_cos.min() > 0.99
    assert 1 - fp8_cos.min() > 1 - bf16_cos.min()  # quantized: further than bf16, never equal
    relative = np.linalg.norm(fp8 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    assert relative.max() < E4M3_HALF_STEP


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: per-head q/k norms between the GEMMs
def test_gptq_fp8_weights_beat_round_to_nearest(family, smollm_tokenizer):
    """GPTQ's FP8 weights are e4m3 values on round-to-nearest's scales; the FP8 layers hold exactly
    them; the all-FP8 encoder is closer to fp32 with them, on the calibration texts and on others."""
    from llm2vec_fast.layer_sensitivity import calibration_inputs

    encoder = _tiny_encoder(family, smollm_tokenizer)
    inputs = calibration_inputs(64)
    held_out = ["A cat sleeps on the sofa.", ["Retrieve semantically similar text.", "It rains in Paris."], "Stocks fell on Monday."]
    fp32 = {k: encoder.encode(v, convert_to_numpy=True) for k, v in (("calib", inputs), ("held", held_out))}
    rounded = gptq_fp8_weights(encoder, inputs)
    assert len(rounded) == 14 and not any(isinstance(m, FP8Linear) for m in encoder.model.modules())
    np.testing.assert_array_equal(encoder.encode(held_out, convert_to_numpy=True), fp32["held"])  # unchanged
    linears = dict(encoder.model.named_modules())
    changed = 0
    for name, (q, scales) in rounded.items():
        w = linears[name].weight
        assert q.dtype == FP8_DTYPE and q.shape == w.shape and scales.shape == (w.shape[0], 1)
        nearest_q, nearest_scales = quantize_rows(w)
        torch.testing.assert_close(scales, nearest_scales, rtol=0, atol=0)
        changed += int((q.float() != nearest_q.float()).sum())
    assert changed > 0
    errors = {}
    for rounding in ("nearest", "gptq"):
        quantized = copy.deepcopy(encoder)
        report = apply_fp8(quantized, "fp8-simulated", high_precision_layers=[], rounding=rounding, gptq_inputs=inputs)
        assert report["rounding"] == rounding and report["fp8_linears"] == 14
        if rounding == "gptq":
            for name, (q, scales) in rounded.items():
                layer = quantized.model.get_submodule(name)
                assert torch.equal(layer.weight_fp8.view(torch.uint8), q.view(torch.uint8)) and torch.equal(layer.weight_scales, scales.t())
        errors[rounding] = {
            k: 1 - cosine_rows(quantized.encode(v, convert_to_numpy=True), fp32[k]).mean()
            for k, v in (("calib", inputs), ("held", held_out))
        }
    assert errors["gptq"]["calib"] < 0.8 * errors["nearest"]["calib"]
    assert errors["gptq"]["held"] < errors["nearest"]["held"]
    with pytest.raises(ValueError, match="unknown FP8 weight rounding 'stochastic'"):
        apply_fp8(copy.deepcopy(encoder), "fp8-simulated", rounding="stochastic")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma", "gemma2", "phi3"])
def test_default_fp8_on_other_families(family, smollm_tokenizer):
    """The default FP8 load (GPTQ weights, calibrated layers) on the other families of the matrix:
    q/k/v biases (Qwen2), GeGLU and scaled embeddings (Gemma), soft-capping and sandwich norms
    (Gemma2), stacked qkv / gate_up projections (Phi-3). Every decoder linear layer is GPTQ-rounded,
    and all-FP8 GPTQ is closer to fp32 than all-FP8 nearest on the calibration texts."""
    from llm2vec_fast.layer_sensitivity import calibration_inputs, decoder_layer_linears

    encoder = _tiny_encoder(family, smollm_tokenizer)
    inputs = calibration_inputs(48)
    fp32 = encoder.encode(inputs, convert_to_numpy=True)
    rounded = gptq_fp8_weights(encoder, inputs)
    assert set(rounded) == {n for layer in decoder_layer_linears(encoder) for n in layer}
    error = {}
    for rounding in ("nearest", "gptq"):
        quantized = copy.deepcopy(encoder)
        apply_fp8(quantized, "fp8-simulated", high_precision_layers=[], rounding=rounding, gptq_inputs=inputs)
        error[rounding] = 1 - cosine_rows(quantized.encode(inputs, convert_to_numpy=True), fp32).mean()
    assert error["gptq"] < error["nearest"]
    calibrated = copy.deepcopy(encoder)
    report = apply_fp8(calibrated, "fp8-simulated", calibration_inputs=inputs, gptq_inputs=inputs)
    assert report["rounding"] == "gptq" and report["fp8_linears"] == sum(isinstance(m, FP8Linear) for m in calibrated.model.modules())
    assert cosine_rows(calibrated.encode(TEXTS, convert_to_numpy=True), encoder.encode(TEXTS, convert_to_numpy=True)).min() > 0.99


def test_listed_layers_stay_in_high_precision(smollm_tokenizer):
    encoder = _tiny_encoder("llama", smollm_tokenizer)
    report = apply_fp8(encoder, "fp8-simulated", high_precision_layers=[1])
    layers = encoder.model.layers
    assert all(isinstance(m, FP8Linear) for m in (layers[0].self_attn.q_proj, layers[0].mlp.down_proj))
    assert not any(isinstance(m, FP8Linear) for m in layers[1].modules())
    assert sum(isinstance(m, nn.Linear) for m in layers[1].modules()) == 7
    assert report["high_precision_layers"] == [1] and report["fp8_linears"] == 7
    with pytest.raises(ValueError, match="out of range"):
        apply_fp8(_tiny_encoder("llama", smollm_tokenizer), "fp8-simulated", high_precision_layers=[2])
    with pytest.raises(ValueError, match="calibrate"):
        apply_fp8(_tiny_encoder("llama", smollm_tokenizer), "fp8-simulated", high_precision_layers="auto")


def test_calibration_keeps_the_sensitive_layer(smollm_tokenizer):
    """With a threshold between the two layers' single-layer scores, the more sensitive layer stays
    in high precision and the other runs FP8; impossible / trivial thresholds keep all / none."""
    encoder = _tiny_encoder("llama", smollm_tokenizer)
    simulator = fp8_simulator(encoder)
    reference = simulator.embed(set(), TEXTS)
    (min0, mean0), (min1, mean1) = simulator.layer_sensitivity(TEXTS, reference)
    assert min0 != min1 and all(0.99 < c < 1.0 for c in (min0, min1, mean0, mean1))
    sensitive = 0 if min0 < min1 else 1
    threshold = (min0 + min1) / 2
    keep, summary = calibrate_fp8_layers(encoder, TEXTS, min_cos=threshold, mean_cos=0.0)
    assert keep == [sensitive] and summary["fp8_layers"] == [1 - sensitive] and summary["high_precision_layers_alone"] == [sensitive]
    assert calibrate_fp8_layers(encoder, TEXTS, min_cos=1.01)[0] == [0, 1]
    assert calibrate_fp8_layers(encoder, TEXTS, min_cos=0.0, mean_cos=0.0)[0] == []
    # nothing was left swapped in by the simulation
    assert not any(isinstance(m, FP8Linear) for m in encoder.model.modules())
    np.testing.assert_array_equal(simulator.embed(set(), TEXTS), reference)


def test_from_pretrained_calibrates_and_refuses_to_save(tiny_llama_dir, tmp_path):
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", quantization="fp8-simulated")
    report = encoder.quantization_report
    calibration = report["calibration"]
    assert len(calibration["layer_sensitivity"]) == 2 and calibration["calibration_inputs"] > calibration["sensitivity_inputs"] > 0
    assert report["high_precision_layers"] == calibration["high_precision_layers"]
    assert report["fp8_linears"] == 7 * (2 - len(report["high_precision_layers"]))
    assert sum(isinstance(m, FP8Linear) for m in encoder.model.modules()) == report["fp8_linears"]
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", quantization="fp8-simulated", high_precision_layers=[])
    assert encoder.quantization_report["fp8_linears"] == 14 and "calibration" not in encoder.quantization_report
    assert encoder.encode(["hello world"], convert_to_numpy=True).shape == (1, 64)
    with pytest.raises(ValueError, match="cannot be saved"):
        encoder.save(tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"module.to\(dtype\) after quantization"):
        encoder.to(torch.bfloat16).encode(["hello world"])
    with pytest.raises(ValueError, match="unknown FP8 weight rounding 'int8'"):
        LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", quantization="fp8-simulated", fp8_rounding="int8")


@pytest.mark.skipif(fp8_unsupported_reason("cuda") is None, reason="checks the error without an FP8 GPU")
def test_fp8_without_an_fp8_gpu_names_the_requirement(tiny_llama_dir, smollm_tokenizer):
    with pytest.raises(FP8UnsupportedError, match=r"compute capability 8\.9 or newer.*fp8-simulated"):
        LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", quantization="fp8")
    with pytest.raises(FP8UnsupportedError, match=r"compute capability 8\.9 or newer"):
        LLM2Vec.from_pretrained(tiny_llama_dir, device="cuda", quantization="fp8")
    with pytest.raises(FP8UnsupportedError, match="the device is cpu"):
        apply_fp8(_tiny_encoder("llama", smollm_tokenizer), "fp8", high_precision_layers=[])
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", quantization="int4")


def test_cli_quantization_option(tiny_llama_dir, capsys):
    from llm2vec_fast.cli import build_parser, main
    from llm2vec_fast.cli.common import encoder_kwargs

    for command in (["encode", "x"], ["eval", "sts"], ["serve"], ["encode-dataset", "-i", "in.jsonl", "-o", "out"]):
        args = build_parser().parse_args([*command, "--quantization", "fp8-simulated", "--high-precision-layers", "0,3"])
        kwargs = encoder_kwargs(args)
        assert kwargs["quantization"] == "fp8-simulated" and kwargs["high_precision_layers"] == [0, 3]
    args = build_parser().parse_args(["encode", "x"])
    assert encoder_kwargs(args)["quantization"] is None and encoder_kwargs(args)["high_precision_layers"] == "calibrate"
    assert encoder_kwargs(args)["fp8_rounding"] == "gptq"
    assert encoder_kwargs(build_parser().parse_args(["serve", "--fp8-rounding", "nearest"]))["fp8_rounding"] == "nearest"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["encode", "x", "--fp8-rounding", "stochastic"])
    assert build_parser().parse_args(["encode", "x", "--high-precision-layers", ""]).high_precision_layers == []
    if fp8_unsupported_reason("cuda") is not None:
        assert main(["encode", "--model", tiny_llama_dir, "--device", "cpu", "--quantization", "fp8", "x"]) == 2
        assert "compute capability 8.9" in capsys.readouterr().err


def test_cli_encodes_with_each_fp8_rounding(tiny_llama_dir, tmp_path):
    """``llm2vec-fast encode --quantization fp8-simulated --fp8-rounding ...`` end to end: both
    roundings write embeddings close to the unquantized ones, and not the same as each other."""
    from llm2vec_fast.cli import main

    texts = ["A man is playing a guitar.", "Two dogs run through the snow.", "How do I reset my password?"]
    common = ["encode", "--model", tiny_llama_dir, "--device", "cpu", *texts]
    assert main([*common, "-o", str(tmp_path / "plain.npy")]) == 0
    plain = np.load(tmp_path / "plain.npy")
    out = {}
    for rounding in ("gptq", "nearest"):
        path = tmp_path / f"{rounding}.npy"
        args = ["--quantization", "fp8-simulated", "--fp8-rounding", rounding, "--high-precision-layers", "", "-o", str(path)]
        assert main([*common, *args]) == 0
        out[rounding] = np.load(path)
        assert out[rounding].shape == plain.shape and cosine_rows(out[rounding], plain).min() > 0.99
    assert not np.array_equal(out["gptq"], out["nearest"])


def test_dataset_settings_record_the_quantization(smollm_tokenizer):
    from llm2vec_fast.dataset.settings import encoder_settings

    encoder = _tiny_encoder("llama", smollm_tokenizer)
    plain = encoder_settings(encoder)
    assert "quantization" not in plain  # manifests of unquantized jobs are unchanged
    nearest = copy.deepcopy(encoder)
    apply_fp8(encoder, "fp8-simulated", high_precision_layers=[1])
    settings = encoder_settings(encoder)
    assert settings["quantization"] == "fp8-simulated" and settings["high_precision_layers"] == [1]
    assert settings["weights"] != plain["weights"]
    apply_fp8(nearest, "fp8-simulated", high_precision_layers=[1], rounding="nearest")
    assert (settings["fp8_rounding"], encoder_settings(nearest)["fp8_rounding"]) == ("gptq", "nearest")

    # every layer in FP8 (its weights are buffers): other weights still give another fingerprint, so
    # a job cannot resume with a different model
    first, second = _tiny_encoder("llama", smollm_tokenizer), _tiny_encoder("llama", smollm_tokenizer)
    with torch.no_grad():
        second.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    for each in (first, second):
        apply_fp8(each, "fp8-simulated", high_precision_layers=[], rounding="nearest")
    assert encoder_settings(first)["weights"] != encoder_settings(second)["weights"]
    assert encoder_settings(first)["weights"] == encoder_settings(copy.deepcopy(first))["weights"]


@pytest.mark.skipif(fp8_unsupported_reason("cuda") is not None, reason="needs a CUDA GPU of compute capability 8.9+")
def test_scaled_mm_matches_the_simulation_on_gpu(smollm_tokenizer):
    """The GPU path and the simulation share scales and fp8 values; only the matmul differs."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=True).cuda().bfloat16().requires_grad_(False)
    x = torch.randn(3, 77, 256, device="cuda", dtype=torch.bfloat16)
    gpu = FP8Linear.from_linear(linear, simulate=False)
    sim = FP8Linear.from_linear(linear, simulate=True)
    assert torch.equal(gpu.weight_fp8.view(torch.uint8), sim.weight_fp8.view(torch.uint8))
    y_gpu, y_sim = gpu(x).float(), sim(x).float()
    # same products, other summation order, both rounded to bf16 once (2**-8 relative)
    torch.testing.assert_close(y_gpu, y_sim, rtol=2**-7, atol=2**-7 * y_sim.abs().max().item())
    encoder = _tiny_encoder("llama", smollm_tokenizer).cuda().bfloat16()
    simulated = copy.deepcopy(encoder)
    apply_fp8(encoder, "fp8", high_precision_layers=[])
    apply_fp8(simulated, "fp8-simulated", high_precision_layers=[])
    cos = cosine_rows(encoder.encode(TEXTS, convert_to_numpy=True), simulated.encode(TEXTS, convert_to_numpy=True))
    assert cos.min() > 0.999
