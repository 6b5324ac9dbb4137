"""The family x attention-path matrix (``llm2vec_fast.support``, also the README's support table).

Every cell builds a tiny random causal LM of the family (2 layers, hidden 128, 4 query / 2 KV
heads of 32, sliding windows and soft-caps small enough to matter) and checks, on that path:

1. bidirectional: changing the last token changes the first token's hidden state;
2. packed equals padded, batch-size invariant: a text embeds the same alone and among other texts
   (max diff <= 1e-5 in fp32), and the same as the plain padded eager reference;
3. ``padding_side`` left and right give the same embeddings and the same MNTP and contrastive
   (SimCSE-style InfoNCE) losses and gradients, equal to the eager reference's.

On CPU the packed Triton cells run the kernels under ``TRITON_INTERPRET=1``; ``flex_attention`` runs
uncompiled (``torch.compile`` of flex on a 2-core CPU takes minutes; the masks are the same).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from llm2vec_fast import LLM2Vec, UnsupportedAttentionError, enable_bidirectional
from llm2vec_fast.bidirectional import decoder_of
from llm2vec_fast.packing import pack
from llm2vec_fast.prompting import EncodingInput
from llm2vec_fast.support import FAMILIES, PATHS, Cell, cell, tested_cells
from llm2vec_fast.train.losses import info_nce
from llm2vec_fast.train.mntp import final_logit_softcap, mask_token_id, mntp_batch, packed_mntp_loss, padded_mntp_loss
from llm2vec_fast.varlen_attention import kernel_backend, packed_hidden_states

TOL = 1e-5
TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
MATES = ["hi", "A much longer sentence that forces plenty of padding on the shorter ones in this batch, twice over.", "", "x y"]
MNTP_TEXTS = [TEXT, "A man is playing a guitar on the stage tonight.", "short one", MATES[1]]
QUERIES = [TEXT, "Two dogs run through the snow.", ["Retrieve a similar sentence:", "A woman slices an onion."]]
DOCS = ["A fox jumps over a dog.", "Dogs are running in a snowy field.", "Someone is cutting an onion in the kitchen."]

# small enough that capping changes the result (asserted in test_softcap_values_matter)
GEMMA2_SOFTCAPS = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
FAMILY_OVERRIDES = {
    "mistral": dict(sliding_window=4),  # a window far shorter than the texts: any path that kept it would differ
    # larger initial weights, so attention logits reach the cap
    "gemma2": dict(sliding_window=4, query_pre_attn_scalar=32, initializer_range=0.1, **GEMMA2_SOFTCAPS),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
}


def matrix_config(family: str, **overrides):
    values = dict(
        hidden_size=128,
        intermediate_size=256,
        head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    values.update(FAMILY_OVERRIDES.get(family, {}))
    values.update(overrides)
    return tiny_config(family, **values)


def _lm(family: str, attn: str, **overrides):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(matrix_config(family, **overrides), attn_implementation=attn, dtype=torch.float32)
    return enable_bidirectional(lm.eval())


@pytest.fixture(autouse=True)
def _uncompiled_flex(monkeypatch):
    """transformers compiles flex_attention on first use; on CPU run the same op eagerly."""
    import transformers.integrations.flex_attention as flex

    if hasattr(flex, "compile_friendly_flex_attention"):
        from torch.nn.attention.flex_attention import flex_attention

        monkeypatch.setattr(flex, "compile_friendly_flex_attention", lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw))


@pytest.fixture(scope="module")
def tokenizers(smollm_tokenizer):
    """The SmolLM2 tokenizer as the user passes it: padding on the left and on the right, no pad token."""
    out = {}
    for side in ("left", "right"):
        tok = copy.deepcopy(smollm_tokenizer)
        tok.padding_side = side
        tok.truncation_side = side
        tok.pad_token = None
        out[side] = tok
    return out


def _backend(c: Cell):
    return kernel_backend(c.path.packed_backend) if c.path.packed_backend else contextlib.nullcontext()


def _hidden(c: Cell, decoder, ids: list[int]) -> torch.Tensor:
    """Per-token last hidden states ``[L, D]`` of one sequence on the cell's path."""
    with torch.no_grad(), _backend(c):
        if c.path.packed_backend:
            return packed_hidden_states(decoder, decoder, pack([EncodingInput(ids, 1)]))
        return decoder(input_ids=torch.tensor([ids])).last_hidden_state[0]


def _embed(c: Cell, enc: LLM2Vec, items, grad: bool = False) -> torch.Tensor:
    with contextlib.nullcontext() if grad else torch.no_grad(), _backend(c):
        if c.path.packed_backend:
            return enc.forward_packed(enc.collate_packed(items))
        return enc(enc.collate(items))


def _has_backward(c: Cell) -> bool:
    return not (c.path.attn_implementation == "flex_attention" and not torch.cuda.is_available())


def _losses_and_grads(c: Cell, lm, tokenizer) -> dict:
    """MNTP and contrastive losses, and the gradients of their sum, on the cell's path (losses only
    for flex_attention on CPU, which has no backward there)."""
    backward = _has_backward(c)
    decoder = decoder_of(lm)
    lm.zero_grad()
    batch = mntp_batch(
        tokenizer,
        MNTP_TEXTS,
        max_length=64,
        mask_id=mask_token_id(tokenizer),
        vocab_size=len(tokenizer),
        special_ids=sorted(set(tokenizer.all_special_ids)),
        probability=0.3,
        full_masking=False,
        generator=torch.Generator().manual_seed(0),
    )
    lm_head, softcap = lm.get_output_embeddings(), final_logit_softcap(lm.config)
    enc = LLM2Vec(decoder, tokenizer, packed=bool(c.path.packed_backend))
    with _backend(c), contextlib.nullcontext() if backward else torch.no_grad():
        if c.path.packed_backend:
            mntp = packed_mntp_loss(decoder, decoder, lm_head, batch, torch.device("cpu"), softcap=softcap)
        else:
            mntp = padded_mntp_loss(decoder, lm_head, batch, softcap=softcap)
    reps = _embed(c, enc, enc.tokenize(QUERIES + DOCS), grad=backward)
    contrastive = info_nce(reps[: len(QUERIES)], reps[len(QUERIES) :])
    grads = None
    if backward:
        (mntp + contrastive).backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    return {"mntp": mntp.detach(), "contrastive": contrastive.detach(), "grads": grads, "batch": batch}


def _reference_path(family: str) -> Cell:
    return cell(family, next(p for p in PATHS if p.name == "eager"))


CELLS = tested_cells()
MODES = ("mean",)  # pooling modes are covered per family in test_bidirectional.py; attention is what varies here
ALL_TEXTS = QUERIES + DOCS + MATES


@pytest.fixture(scope="module")
def references(tokenizers):
    """Per family, computed once: the eager model's weights, its padded embeddings of ALL_TEXTS per
    pooling mode (right-padding tokenizer) and its MNTP / contrastive losses and gradients."""
    cache = {}

    def get(family: str):
        if family not in cache:
            ref = _lm(family, "eager")
            enc = LLM2Vec(decoder_of(ref), tokenizers["right"], packed=False)
            embeddings = {}
            for mode in MODES:
                enc.pooling_mode = mode
                embeddings[mode] = enc.encode(ALL_TEXTS, batch_size=4)
            losses = _losses_and_grads(_reference_path(family), ref, tokenizers["right"])
            cache[family] = ({k: v.clone() for k, v in ref.state_dict().items()}, embeddings, losses)
        return cache[family]

    return get


@pytest.mark.parametrize("c", CELLS, ids=[f"{c.family}-{c.path.name.replace(' ', '')}" for c in CELLS])
def test_family_path_cell(c: Cell, tokenizers, references):
    weights, ref_embeddings, expected = references(c.family)
    lm = _lm(c.family, c.attn_implementation)
    lm.load_state_dict(weights)
    decoder = decoder_of(lm)
    packed = bool(c.path.packed_backend)

    # 1. bidirectional on this path
    ids = tokenizers["right"](TEXT)["input_ids"]
    changed = ids[:-1] + [(ids[-1] + 7) % 40000 + 3]
    shift = (_hidden(c, decoder, ids)[0] - _hidden(c, decoder, changed)[0]).abs().max().item()
    assert shift > 1e-4, f"{c.family} on {c.path.name} is causal: the first token does not see the last"

    # 2. batch-size invariance, and equality with the padded eager reference
    enc = LLM2Vec(decoder, tokenizers["right"], packed=packed, max_tokens_per_batch=512)
    for mode in MODES:
        enc.pooling_mode = mode
        with _backend(c):
            alone = enc.encode([TEXT])[0]
            for batch in ([TEXT] + MATES, MATES + [TEXT]):
                out = enc.encode(batch, batch_size=len(batch))
                assert torch.isfinite(out).all()
                assert (out[batch.index(TEXT)] - alone).abs().max().item() <= TOL, f"{mode}: depends on batch-mates"
            many = enc.encode(ALL_TEXTS, batch_size=4)
        assert (many - ref_embeddings[mode]).abs().max().item() <= TOL, f"{mode}: differs from the padded eager reference"

    # 3. a left-padding tokenizer on this path gives the right-padding reference's embeddings, and
    #    its MNTP / contrastive losses and gradients
    left = LLM2Vec(decoder, tokenizers["left"], packed=packed, max_tokens_per_batch=512)
    assert left.tokenize(ALL_TEXTS) == enc.tokenize(ALL_TEXTS)
    if c.path.packed_backend != "triton":  # same items, same function: the interpreter's time goes to the losses below
        with _backend(c):
            assert (left.encode(ALL_TEXTS, batch_size=3) - ref_embeddings["mean"]).abs().max().item() <= TOL
    got = _losses_and_grads(c, lm, tokenizers["left"])
    assert torch.equal(got["batch"]["input_ids"], expected["batch"]["input_ids"])
    assert torch.equal(got["batch"]["labels"], expected["batch"]["labels"])
    for key in ("mntp", "contrastive"):
        assert abs(got[key].item() - expected[key].item()) <= TOL * max(1.0, abs(expected[key].item())), key
    if got["grads"] is not None:
        assert got["grads"].keys() == expected["grads"].keys()
        for name, g in got["grads"].items():
            torch.testing.assert_close(g, expected["grads"][name], atol=1e-5, rtol=1e-4, msg=name)
    # the user's tokenizers were not touched
    assert tokenizers["left"].padding_side == "left" and tokenizers["left"].pad_token is None


def test_matrix_covers_every_family_and_path():
    assert {c.family for c in CELLS} == set(FAMILIES)
    assert {c.path.name for c in CELLS} == {p.name for p in PATHS if p.in_cpu_matrix}


def test_softcap_values_matter():
    """The Gemma2 cells' soft-caps are small enough to change attention and the MNTP loss, so the
    matrix would notice a path that drops them."""
    capped = _lm("gemma2", "eager")
    plain = _lm("gemma2", "eager", attn_logit_softcapping=None, final_logit_softcapping=None)
    plain.load_state_dict(capped.state_dict())
    ids = torch.randint(3, 40000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (decoder_of(capped)(input_ids=ids).last_hidden_state - decoder_of(plain)(input_ids=ids).last_hidden_state).abs().max()
    assert diff > 0.1
    from llm2vec_fast.train.mntp import mntp_loss

    hidden = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(3, 40000, (2, 8), generator=torch.Generator().manual_seed(2))
    head = capped.get_output_embeddings()
    with torch.no_grad():
        a, b = mntp_loss(hidden, labels, head, softcap=3.0), mntp_loss(hidden, labels, head)
    assert abs(a.item() - b.item()) > 1e-2


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_with_sliding_window_raises(impl):
    lm = AutoModelForCausalLM.from_config(matrix_config("mistral"))
    lm.config._attn_implementation = impl  # loading with it needs flash-attn and a GPU
    with pytest.raises(UnsupportedAttentionError, match=r"'mistral'.*flash_attention"):
        enable_bidirectional(lm)


@pytest.mark.parametrize("impl", ["paged|sdpa", "kernels-community/flash-attn", "my_custom_attention"])
def test_unknown_attention_implementation_raises_naming_model_and_implementation(impl):
    lm = AutoModelForCausalLM.from_config(matrix_config("qwen3"))
    lm.config._attn_implementation = impl
    with pytest.raises(UnsupportedAttentionError, match=rf"'qwen3'.*{impl.replace('|', '[|]')}"):
        enable_bidirectional(lm)


def test_switching_to_an_unknown_implementation_after_enabling_raises_on_forward():
    lm = _lm("llama", "sdpa")
    decoder_of(lm).config._attn_implementation = "my_custom_attention"
    with pytest.raises(UnsupportedAttentionError, match="'llama'.*my_custom_attention"):
        decoder_of(lm)(input_ids=torch.tensor([[5, 6, 7]]))
