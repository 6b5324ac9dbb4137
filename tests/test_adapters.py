"""LoRA adapters: single, merged, chained (MNTP merged then SimCSE on top), official mntp layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

from llm2vec_fast import LLM2Vec

TEXTS = ["A man is playing a guitar.", ["Retrieve similar text:", "A woman slices an onion."]]


def _make_adapter(base_dir: str, out_dir, seed: int) -> None:
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # non-zero so the adapter changes the output
    peft_model.save_pretrained(out_dir)


def _manual(base_dir, adapters, merge_last=True):
    from peft import PeftModel

    from llm2vec_fast.bidirectional import enable_bidirectional

    model = AutoModel.from_pretrained(base_dir)
    for i, a in enumerate(adapters):
        model = PeftModel.from_pretrained(model, str(a))
        if i < len(adapters) - 1 or merge_last:
            model = model.merge_and_unload()
    from transformers import AutoTokenizer

    return LLM2Vec(enable_bidirectional(model), AutoTokenizer.from_pretrained(base_dir)).encode(TEXTS)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    _make_adapter(tiny_llama_dir, root / "mntp", seed=1)
    _make_adapter(tiny_llama_dir, root / "simcse", seed=2)
    return root / "mntp", root / "simcse"


def test_single_adapter_merged_or_not(tiny_llama_dir, adapters):
    base = LLM2Vec.from_pretrained(tiny_llama_dir).encode(TEXTS)
    unmerged = LLM2Vec.from_pretrained(tiny_llama_dir, peft_model_name_or_path=str(adapters[0])).encode(TEXTS)
    merged = LLM2Vec.from_pretrained(tiny_llama_dir, peft_model_name_or_path=str(adapters[0]), merge_peft=True).encode(TEXTS)
    assert not torch.allclose(base, unmerged, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unmerged, _manual(tiny_llama_dir, adapters[:1]), atol=1e-5, rtol=1e-5)


def test_chained_adapters(tiny_llama_dir, adapters):
    chained = LLM2Vec.from_pretrained(tiny_llama_dir, peft_model_name_or_path=[str(a) for a in adapters]).encode(TEXTS)
    torch.testing.assert_close(chained, _manual(tiny_llama_dir, adapters), atol=1e-5, rtol=1e-5)
    only_second = LLM2Vec.from_pretrained(tiny_llama_dir, peft_model_name_or_path=str(adapters[1])).encode(TEXTS)
    assert not torch.allclose(chained, only_second, atol=1e-3)


def test_official_mntp_layout_config_plus_adapter_without_weights(tiny_llama_dir, adapters, tmp_path):
    """Official "-mntp" folders hold config.json + a LoRA adapter; the base comes from the adapter config."""
    mntp = tmp_path / "mntp-folder"
    shutil.copytree(adapters[0], mntp)
    shutil.copy(f"{tiny_llama_dir}/config.json", mntp / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_llama_dir}/{name}", mntp / name)
    cfg = json.loads((mntp / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = tiny_llama_dir
    (mntp / "adapter_config.json").write_text(json.dumps(cfg))
    enc = LLM2Vec.from_pretrained(str(mntp), peft_model_name_or_path=str(adapters[1]))
    torch.testing.assert_close(enc.encode(TEXTS), _manual(tiny_llama_dir, adapters), atol=1e-5, rtol=1e-5)


def test_missing_adapter_folder(tiny_llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LLM2Vec.from_pretrained(tiny_llama_dir, peft_model_name_or_path=str(tmp_path))


def test_save_merges_adapter(tiny_llama_dir, adapters, tmp_path):
    enc = LLM2Vec.from_pretrained(tiny_llama_dir, peft_model_name_or_path=str(adapters[0]))
    enc.save(tmp_path / "merged")
    reloaded = LLM2Vec.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(reloaded.encode(TEXTS), enc.encode(TEXTS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_lora_equals_peft_merge(tiny_llama_dir, tmp_path, rslora, monkeypatch):
    """The direct merge (used to load the default encoder fast) gives peft's merged weights; an
    adapter with another LoRA option (rsLoRA scaling) goes through peft itself."""
    from peft import PeftModel

    from llm2vec_fast.loading import merge_lora

    torch.manual_seed(3)
    peft_model = get_peft_model(
        AutoModel.from_pretrained(tiny_llama_dir),
        LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"]),
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "a")
    expected = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llama_dir), str(tmp_path / "a")).merge_and_unload()
    from llm2vec_fast import loading

    through_peft = []
    real = loading.apply_adapters
    monkeypatch.setattr(loading, "apply_adapters", lambda *a, **kw: through_peft.append(1) or real(*a, **kw))
    merged = merge_lora(AutoModel.from_pretrained(tiny_llama_dir), tmp_path / "a")
    assert bool(through_peft) == rslora  # plain LoRA: merged directly, without peft
    want = expected.state_dict()
    got = merged.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        got["layers.0.self_attn.q_proj.weight"], AutoModel.from_pretrained(tiny_llama_dir).state_dict()["layers.0.self_attn.q_proj.weight"]
    )


def test_merge_lora_rejects_an_adapter_for_another_model(tiny_llama_dir, adapters, tmp_path):
    from llm2vec_fast.loading import merge_lora

    shutil.copytree(adapters[0], tmp_path / "a")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k.replace("layers.0.", "layers.99."): v for k, v in weights.items()}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="layers.99"):
        merge_lora(AutoModel.from_pretrained(tiny_llama_dir), tmp_path / "a")
