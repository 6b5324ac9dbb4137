"""Bidirectional attention on every supported family, and no padding leaks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModel

from llm2vec_fast import LLM2Vec, UnsupportedArchitectureError, enable_bidirectional
from llm2vec_fast.bidirectional import is_bidirectional

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]
# Gemma2 has no SDPA support in transformers (soft-capping): eager only.
FAMILY_ATTN = [(f, a) for f in FAMILIES for a in ("sdpa", "eager") if not (f == "gemma2" and a == "sdpa")]


def _tiny(family: str, attn: str | None = None, vocab_size: int = 512):
    torch.manual_seed(0)
    attn = attn or ("eager" if family == "gemma2" else "sdpa")
    config = tiny_config(family, vocab_size=vocab_size)
    return AutoModel.from_config(config, attn_implementation=attn).eval()


def _first_token_shift(model) -> float:
    ids = torch.randint(3, 500, (2, 9))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 500 + 3
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state[:, 0]
        b = model(input_ids=changed).last_hidden_state[:, 0]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family,attn", FAMILY_ATTN)
def test_last_token_changes_first_hidden_state(family, attn):
    model = _tiny(family, attn)
    assert _first_token_shift(model) == 0.0, "a causal model must not see the future"
    enable_bidirectional(model)
    assert is_bidirectional(model)
    assert _first_token_shift(model) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_mask_with_bidirectional_matches_unpadded(family):
    model = enable_bidirectional(_tiny(family))
    ids = torch.randint(3, 500, (1, 6))
    padded = torch.cat([ids, torch.full((1, 4), 2)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        alone = model(input_ids=ids).last_hidden_state
        with_pad = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :6]
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,attn", FAMILY_ATTN)
def test_encoder_embedding_independent_of_batch_mates(family, attn, smollm_tokenizer):
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(family), attn_implementation=attn).eval()
    enc = LLM2Vec(enable_bidirectional(model), smollm_tokenizer)
    text = "The quick brown fox jumps over the lazy dog."
    mates = ["hi", "A much longer sentence that forces plenty of padding on the shorter ones in this batch.", ""]
    for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
        enc.pooling_mode = mode
        alone = enc.encode([text])[0]
        for batch in ([text] + mates, mates + [text]):
            out = enc.encode(batch, batch_size=len(batch))
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[batch.index(text)], alone, atol=1e-5, rtol=1e-4)


def test_works_through_causal_lm_and_peft_wrappers():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=512)).eval()
    peft_model = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable_bidirectional(peft_model)
    base = peft_model.get_base_model().model
    assert _first_token_shift(base) > 1e-4


@pytest.mark.parametrize("family", ["bloom", "mamba"])
def test_unsupported_architecture_raises_clear_error(family):
    import transformers

    config = {
        "bloom": lambda: transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=2),
        "mamba": lambda: transformers.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, state_size=4),
    }[family]()
    model = AutoModel.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="enable_bidirectional=False"):
        enable_bidirectional(model)
