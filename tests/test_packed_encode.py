"""The packed (padding-free) encode path: varlen attention + varlen pooling through the model.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (``kernel_backend("triton")``); the
library's own CPU default is the torch reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModel

from llm2vec_fast import LLM2Vec, enable_bidirectional
from llm2vec_fast.packing import pack, token_budget_batches
from llm2vec_fast.prompting import EncodingInput
from llm2vec_fast.varlen_attention import kernel_backend

TEXTS = [
    "A man is playing a guitar.",
    ["Retrieve semantically similar text:", "A woman is slicing an onion in the kitchen."],
    "x",
    "",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up.",
]
MODES = ["mean", "weighted_mean", "last_token", "bos_token", "eos_token"]


def _cosine_min(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def test_token_budget_batches_respect_budget_and_cover_all():
    lengths = [5, 300, 17, 1, 64, 64, 900, 2]
    batches = token_budget_batches(lengths, max_tokens=128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 128
    assert [6] in batches and [1] in batches, "longer-than-budget sequences run alone"
    with pytest.raises(ValueError):
        token_budget_batches(lengths, 0)


def test_pack_layout():
    items = [EncodingInput([5, 6, 7], 2), EncodingInput([8], 1), EncodingInput([9, 10], 2)]
    p = pack(items)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p["cu_seqlens"].tolist() == [0, 3, 4, 6] and p["cu_seqlens"].dtype == torch.int32
    assert p["max_seqlen"] == 3
    assert p["pool_mask"].tolist() == [False, True, True, True, True, True]


@pytest.fixture(scope="module")
def tiny_encoder(smollm_tokenizer):
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=128))
    return LLM2Vec(enable_bidirectional(model.eval()), smollm_tokenizer)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_matches_padded_tiny_llama(tiny_encoder, mode, backend):
    tiny_encoder.pooling_mode = mode
    tiny_encoder.packed = False
    padded = tiny_encoder.encode(TEXTS, batch_size=5)
    tiny_encoder.packed = True
    tiny_encoder.max_tokens_per_batch = 24  # several packed batches
    with kernel_backend(backend):
        packed = tiny_encoder.encode(TEXTS)
    tiny_encoder.packed = None
    assert torch.isfinite(packed).all()
    assert _cosine_min(packed, padded) > 0.99999
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)


def test_packed_gradients_match_padded(tiny_encoder):
    """Training uses the packed path: its gradients must equal the padded path's."""
    tiny_encoder.pooling_mode = "mean"
    items = tiny_encoder.tokenize(TEXTS)
    grads = []
    for packed in (False, True):
        tiny_encoder.zero_grad()
        with kernel_backend("triton"):
            emb = tiny_encoder.forward_packed(tiny_encoder.collate_packed(items)) if packed else tiny_encoder(tiny_encoder.collate(items))
        (emb.square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in tiny_encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3, msg=name)


def test_packed_matches_padded_default_model(default_encoder):
    default_encoder.packed = False
    padded = default_encoder.encode(TEXTS[:3])
    default_encoder.packed = True
    try:
        with kernel_backend("triton"):
            packed = default_encoder.encode(TEXTS[:3])
    finally:
        default_encoder.packed = None
    assert _cosine_min(packed, padded) > 0.9999  # bf16-level tolerance; fp32 here is far tighter
    assert (packed - padded).abs().max() < 1e-3 * padded.abs().max()


def test_packed_requires_bidirectional(smollm_tokenizer):
    model = AutoModel.from_config(tiny_config("llama"))
    enc = LLM2Vec(model, smollm_tokenizer, packed=True)
    with pytest.raises(ValueError, match="bidirectional"):
        enc.encode(["hello"])


def test_a_decoder_that_drops_the_packing_kwargs_is_refused(smollm_tokenizer, monkeypatch):
    """transformers' Falcon does not pass its keyword arguments to its layers: packed, its texts
    would attend to each other (2.3 off). A packed forward refuses it, and packing is on by default
    (on CUDA) only for the families tested packed; a generic decoder that passes them (GPT-2) packs."""
    import transformers

    from llm2vec_fast.bidirectional import UnsupportedArchitectureError

    texts = ["A man is playing a guitar.", "Dogs run.", "x"]
    torch.manual_seed(0)
    falcon = transformers.FalconConfig(vocab_size=49152, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    encoder = LLM2Vec(enable_bidirectional(AutoModel.from_config(falcon).eval()), smollm_tokenizer, packed=True)
    # 5.25 drops the kwargs (the attention call says so); 5.17 bypasses the attention interface (counted)
    with kernel_backend("torch"), pytest.raises(UnsupportedArchitectureError, match="no packing metadata|received the packing metadata"):
        encoder.encode(texts)
    gpt2 = transformers.GPT2Config(vocab_size=49152, n_embd=128, n_layer=2, n_head=4)
    generic = LLM2Vec(enable_bidirectional(AutoModel.from_config(gpt2).eval()), smollm_tokenizer)
    padded = generic.encode(texts, convert_to_tensor=True)
    generic.packed = True
    with kernel_backend("torch"):
        torch.testing.assert_close(generic.encode(texts, convert_to_tensor=True), padded, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(LLM2Vec, "device", property(lambda self: torch.device("cuda")))
    encoder.packed = generic.packed = None
    llama = LLM2Vec(enable_bidirectional(AutoModel.from_config(tiny_config("llama")).eval()), smollm_tokenizer)
    assert (encoder.use_packed, generic.use_packed, llama.use_packed) == (False, False, True)
