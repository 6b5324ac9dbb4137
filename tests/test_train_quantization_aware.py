"""Quantization-aware training for the int8 export (``quantization_aware: int8``): the simulated
forward is the export's (``Int8Simulator`` on the merged model), the straight-through gradients reach
the LoRA weights only, a training run writes an ordinary adapter, and bad options are refused."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from llm2vec_fast.export.calibrate import Int8Simulator, onnx_matmul_name
from llm2vec_fast.export.cpu_int8 import WEIGHT_LEVELS, int8_weight_bits
from llm2vec_fast.export.int8_rounding import fake_int8_rows, fake_int8_weight
from safetensors.torch import load_file
from torch import nn

from llm2vec_fast import LLM2Vec
from llm2vec_fast.train import ConfigError, SimCSEConfig, load_config, make_config, train
from llm2vec_fast.train.quantization_aware import QuantizationAwareInt8, quantized_linears
from llm2vec_fast.train.trainer import add_lora

TEXTS = [
    "A man is playing a guitar.",
    ["Retrieve a passage that answers the question", "How do plants make food?"],
    "x",
    "The committee met on Tuesday to review the proposal for the new public library.",
]
SENTENCES = [f"sentence number {i} talks about {w}." for i, w in enumerate(["cats", "dogs", "rain", "music"] * 4)]


def lora_encoder(family: str, tokenizer, lora_layers: int | None = None, dropout: float = 0.0) -> LLM2Vec:
    """A tiny random bidirectional encoder whose decoder carries a LoRA adapter with random (nonzero) A and B."""
    from transformers import AutoModel

    from llm2vec_fast.bidirectional import enable_bidirectional

    torch.manual_seed(0)
    decoder = enable_bidirectional(AutoModel.from_config(tiny_config(family), attn_implementation="sdpa"))
    for p in decoder.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(decoder, SimCSEConfig(lora_r=4, lora_alpha=8, lora_dropout=dropout, lora_layers=lora_layers))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return LLM2Vec(peft_model, tokenizer, max_length=64).eval()


def merged(encoder: LLM2Vec) -> LLM2Vec:
    """The encoder with its adapter merged into the weights, as the export sees it."""
    return LLM2Vec(copy.deepcopy(encoder.model).merge_and_unload(), encoder.tokenizer, max_length=64).eval()


@pytest.mark.parametrize(
    "family, bits, lora_layers",
    [("llama", 7, None), ("llama", 8, None), ("llama", 7, 1), ("qwen2", 7, None)],  # qwen2: q/k/v biases
)
def test_simulated_forward_matches_the_export(family, bits, lora_layers, smollm_tokenizer):
    """In eval mode the quantization-aware encoder gives the embeddings that ``Int8Simulator`` gives
    for the merged model with every decoder MatMul in int8; ``lora_layers=1``: the layers without
    an adapter are rounded as well."""
    encoder = lora_encoder(family, smollm_tokenizer, lora_layers)
    export_view = merged(encoder)
    simulator = Int8Simulator(export_view, weight_levels=WEIGHT_LEVELS[bits])
    every_matmul = set(simulator.modules)
    expected = simulator.embed(every_matmul, TEXTS)
    fp32 = export_view.encode(TEXTS, convert_to_numpy=True)

    with QuantizationAwareInt8(encoder.model, bits) as qat:
        assert {onnx_matmul_name(n) for n in qat.modules} == every_matmul  # the same 14 layers
        assert sum(type(m) is nn.Linear for m in qat.modules.values()) == (7 if lora_layers else 0)
        got = encoder.encode(TEXTS, convert_to_numpy=True)
        again = encoder.encode(TEXTS, convert_to_numpy=True)  # from the cached rounded weights
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got, again)
    assert np.abs(got - fp32).max() > 1e-3  # the rounding is really there
    other = Int8Simulator(export_view, weight_levels=WEIGHT_LEVELS[15 - bits]).embed(every_matmul, TEXTS)
    assert np.abs(got - other).max() > 1e-4  # and on the requested grid
    # removed: the ordinary LoRA forward again (= the merged fp32 model)
    np.testing.assert_allclose(encoder.encode(TEXTS, convert_to_numpy=True), fp32, rtol=1e-5, atol=1e-5)


def test_gradients_reach_lora_only(smollm_tokenizer):
    encoder = lora_encoder("llama", smollm_tokenizer, dropout=0.1)
    model = encoder.model.train()
    qat = QuantizationAwareInt8(model, 7)
    features = encoder.collate(encoder.tokenize(TEXTS))
    out = model(input_ids=features["input_ids"], attention_mask=features["attention_mask"], position_ids=features["position_ids"])
    encoder.pool(out.last_hidden_state, features["pool_mask"]).square().sum().backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 14
    for name, p in lora.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    qat.remove()


class OneLayerDecoder(nn.Module):
    """The smallest module :func:`quantized_linears` recognises as a decoder: one layer, one Linear."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Identity()
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(32, 24)})])


def test_straight_through_gradients_on_one_layer():
    """The backward treats both roundings as the identity: ``A`` and ``B`` get the gradient of the
    linear map at the rounded input (``dL/dW = g^T x_q``), the input that of the rounded weight
    (``dL/dx = g W_q``). The per-channel (weights) and per-token (inputs) scales are their maxima,
    so nothing is clipped anywhere."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(OneLayerDecoder(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"]))
    layer = peft_model.base_model.model.layers[0]["proj"]
    a, b, base = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer
    with torch.no_grad():
        b.normal_(0, 0.1)
    keys = set(peft_model.state_dict())
    x = torch.randn(5, 32, requires_grad=True)
    g = torch.randn(5, 24)

    qat = QuantizationAwareInt8(peft_model, 8)
    assert set(peft_model.state_dict()) == keys  # nothing added to the model
    (layer(x) * g).sum().backward()
    grads = a.grad.clone(), b.grad.clone(), x.grad.clone()

    scaling = layer.scaling["default"]
    x_q = fake_int8_rows(x.detach())
    w_q = fake_int8_weight(base.weight + scaling * b.detach() @ a.detach(), WEIGHT_LEVELS[8])
    torch.testing.assert_close(layer(x).detach(), x_q @ w_q.T + base.bias, rtol=1e-6, atol=1e-6)
    for p in (a, b, x):
        p.grad = None
    # the unrounded linear map: weight from A and B at the rounded input, input at the rounded weight
    qat.remove()
    (torch.nn.functional.linear(x_q, base.weight + scaling * b @ a) * g).sum().backward()
    (torch.nn.functional.linear(x, w_q) * g).sum().backward()
    for got, expected in zip(grads, (a.grad, b.grad, x.grad)):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(layer) and base.weight.grad is None


def test_rounded_weights_follow_the_optimizer():
    """The rounded weight is cached per step, and rounded again once the optimizer changes A or B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(OneLayerDecoder(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"]))
    layer = peft_model.base_model.model.layers[0]["proj"]
    x = torch.randn(5, 32)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=10.0)
    with QuantizationAwareInt8(peft_model, 7):
        before = layer(x)
        before.square().sum().backward()
        optimizer.step()
        after = layer(x).detach()
    with QuantizationAwareInt8(peft_model, 7), torch.no_grad():
        fresh = layer(x)
    assert not torch.allclose(before.detach(), after)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_lora_dropout_is_kept_in_training_mode(smollm_tokenizer):
    """Training mode with LoRA dropout: two forwards differ (dropout acts), and their mean over many
    draws is the eval-mode (export) forward: the dropout term has mean zero."""
    encoder = lora_encoder("llama", smollm_tokenizer, dropout=0.5)
    layer = encoder.model.base_model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 6, 64)
    with QuantizationAwareInt8(encoder.model, 7), torch.no_grad():
        layer.eval()
        exact = layer(x)
        layer.train()
        draws = torch.stack([layer(x) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), exact, rtol=0, atol=0.05 * exact.abs().max().item())


def test_unsupported_adapters_are_refused():
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(OneLayerDecoder(), LoraConfig(r=4, target_modules=["proj"], use_dora=True))
    with pytest.raises(ValueError, match="plain LoRA"):
        QuantizationAwareInt8(dora, 7)
    plain = get_peft_model(OneLayerDecoder(), LoraConfig(r=4, target_modules=["proj"]))
    with pytest.raises(ValueError, match="weight_bits"):
        QuantizationAwareInt8(plain, 6)
    with QuantizationAwareInt8(plain, 7):
        with pytest.raises(ValueError, match="attached twice"):
            QuantizationAwareInt8(plain, 7)
    assert list(quantized_linears(plain)) == ["layers.0.proj"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return str(path)


def test_training_run_writes_an_ordinary_adapter(tiny_causal_lm_dir, text_file, tmp_path):
    """MNTP then SimCSE, both quantization-aware, 2 steps each: ordinary LoRA adapters that load with
    ``LLM2Vec.from_pretrained``, and ``train_config.json`` records the option and its bits."""
    common = dict(model=tiny_causal_lm_dir, data=text_file, batch_size=4, max_length=24, max_steps=2, progress=False, device="cpu")
    common.update(lr=1e-3, quantization_aware="int8")
    mntp = train("mntp", make_config("mntp", dict(common, output_dir=str(tmp_path / "mntp"))))
    simcse = train("simcse", make_config("simcse", dict(common, output_dir=str(tmp_path / "simcse"), peft=[str(mntp)])))
    for adapter in (mntp, simcse):
        recorded = json.loads((adapter.parent / "train_config.json").read_text())
        assert recorded["quantization_aware"] == "int8"
        assert recorded["quantization_aware_weight_bits"] == int8_weight_bits("auto")
        keys = load_file(adapter / "adapter_model.safetensors").keys()
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
        assert "quantization" not in (adapter / "adapter_config.json").read_text()
    tuned = LLM2Vec.from_pretrained(tiny_causal_lm_dir, peft_model_name_or_path=[str(mntp), str(simcse)], device="cpu")
    only_mntp = LLM2Vec.from_pretrained(tiny_causal_lm_dir, peft_model_name_or_path=str(mntp), device="cpu")
    a, b = tuned.encode(SENTENCES[:2]), only_mntp.encode(SENTENCES[:2])
    assert a.shape == (2, 64) and torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-6)


def test_bad_options_are_config_errors():
    base = dict(data="sentences.txt")
    with pytest.raises(ConfigError, match=r"quantization_aware must be one of \('int8',\).*'int4'"):
        make_config("simcse", dict(base, quantization_aware="int4"), check_files=False)
    with pytest.raises(ConfigError, match=r"quantization_aware_weight_bits must be one of \(7, 8\).*got 6"):
        make_config("simcse", dict(base, quantization_aware="int8", quantization_aware_weight_bits=6), check_files=False)
    with pytest.raises(ConfigError, match="quantization_aware_weight_bits must be an integer"):
        make_config("supervised", dict(base, quantization_aware="int8", quantization_aware_weight_bits="8bit"), check_files=False)
    with pytest.raises(ConfigError, match="but quantization_aware is not"):
        make_config("mntp", dict(base, quantization_aware_weight_bits=8), check_files=False)
    # the CLI / config-file spelling; unset bits become this CPU's choice
    config = load_config("simcse", overrides=["data=sentences.txt", "quantization_aware=int8"], check_files=False)
    assert config.quantization_aware_weight_bits == int8_weight_bits("auto")
    config = load_config(
        "supervised", overrides=["data=d.jsonl", "quantization_aware=int8", "quantization_aware_weight_bits=7"], check_files=False
    )
    assert config.quantization_aware_weight_bits == 7
    assert make_config("simcse", base, check_files=False).quantization_aware is None


def test_recipe_scripts_take_the_option():
    """``--quantization-aware`` of the recipe scripts (``benchmarks/recipe_sts.py``, ``recipe_default.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from recipe_sts import recipe_stage_configs

    plain = recipe_stage_configs([])
    assert not any(k.startswith("quantization_aware") for stage in plain.values() for k in stage)  # plain runs record what they did
    both = recipe_stage_configs(["--quantization-aware", "mntp+simcse", "--quantization-aware-weight-bits", "7"])
    simcse_only = recipe_stage_configs(["--quantization-aware", "simcse"])
    assert both["mntp"]["quantization_aware"] == both["simcse"]["quantization_aware"] == "int8"
    assert both["simcse"]["quantization_aware_weight_bits"] == 7
    assert "quantization_aware" not in simcse_only["mntp"]
    assert simcse_only["simcse"]["quantization_aware_weight_bits"] == int8_weight_bits("auto")
    assert make_config("simcse", simcse_only["simcse"], check_files=False).quantization_aware == "int8"
