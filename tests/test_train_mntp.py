"""MNTP: masking rules, the shift by one, and the chunked loss against full-vocab logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm2vec_fast.train.losses import linear_cross_entropy
from llm2vec_fast.train.mntp import IGNORE, mask_token_id, mask_tokens, mntp_loss, mntp_targets

SPECIAL = [0, 1, 2]
MASK = 79
VOCAB = 49152


def _batch(b=64, length=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    ids[:, 0] = 1  # a BOS-like special token
    ids[:, length // 3] = 2
    attn = torch.ones_like(ids)
    attn[: b // 2, (3 * length) // 4 :] = 0  # right padding
    ids[attn == 0] = 2
    return ids, attn


def test_mask_token_is_blank_without_tokenizer_mask(smollm_tokenizer):
    assert smollm_tokenizer.mask_token is None
    assert mask_token_id(smollm_tokenizer) == smollm_tokenizer.convert_tokens_to_ids("_")


def test_masking_rates_follow_bert_rule():
    ids, attn = _batch()
    g = torch.Generator().manual_seed(1)
    out, labels = mask_tokens(ids, attn, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, probability=0.2, generator=g)
    candidates = (attn == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != IGNORE
    n_cand, n_sel = int(candidates.sum()), int(selected.sum())
    # 20 % of the candidates, within 5 sigma
    assert abs(n_sel / n_cand - 0.2) < 5 * (0.2 * 0.8 / n_cand) ** 0.5
    assert torch.equal(labels[selected], ids[selected])
    as_mask = int((out[selected] == MASK).sum())
    unchanged = int((out[selected] == ids[selected]).sum())
    randomised = n_sel - as_mask - unchanged
    for count, rate in ((as_mask, 0.8), (unchanged, 0.1), (randomised, 0.1)):
        assert abs(count / n_sel - rate) < 5 * (rate * (1 - rate) / n_sel) ** 0.5
    assert torch.equal(out[~selected], ids[~selected])  # nothing else changes


def test_special_and_padding_tokens_are_never_masked():
    ids, attn = _batch(seed=3)
    for full in (False, True):
        out, labels = mask_tokens(
            ids,
            attn,
            mask_id=MASK,
            vocab_size=VOCAB,
            special_ids=SPECIAL,
            probability=0.9,
            full_masking=full,
            generator=torch.Generator().manual_seed(2),
        )
        special = torch.isin(ids, torch.tensor(SPECIAL)) | (attn == 0)
        assert (labels[special] == IGNORE).all()
        assert torch.equal(out[special], ids[special])


def test_full_masking_replaces_every_selected_token():
    ids, attn = _batch(seed=4)
    out, labels = mask_tokens(
        ids,
        attn,
        mask_id=MASK,
        vocab_size=VOCAB,
        special_ids=SPECIAL,
        probability=0.2,
        full_masking=True,
        generator=torch.Generator().manual_seed(5),
    )
    selected = labels != IGNORE
    assert selected.any() and (out[selected] == MASK).all()


def test_targets_shift_by_one_and_skip_position_zero():
    labels = torch.full((2, 6), IGNORE)
    labels[0, 0] = 11  # a mask at position 0 is never a target
    labels[0, 3] = 33
    labels[1, 5] = 55
    positions, targets = mntp_targets(labels)
    assert positions.tolist() == [[0, 2], [1, 4]]  # predicted from the output at i - 1
    assert targets.tolist() == [33, 55]


def _hf_style_loss(hidden, labels, head):
    """The official loss: full logits, shift by one, mean over the masked positions."""
    logits = head(hidden)
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE)


@pytest.mark.parametrize("chunk", [7, 1024])
def test_mntp_loss_equals_full_logits_loss(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 32, requires_grad=True)
    head = torch.nn.Linear(32, 500, bias=False)
    labels = torch.full((3, 20), IGNORE)
    sel = torch.rand(3, 20) < 0.3
    labels[sel] = torch.randint(0, 500, (int(sel.sum()),))
    labels[:, 0] = 5  # never a target
    ref = _hf_style_loss(hidden, labels, head)
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight])
    got = mntp_loss(hidden, labels, head, chunk=chunk)
    grads = torch.autograd.grad(got, [hidden, head.weight])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_with_bias_and_frozen_weight():
    torch.manual_seed(1)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(300, 16)
    b = torch.randn(300, requires_grad=True)
    t = torch.randint(0, 300, (37,))
    ref = F.cross_entropy(x @ w.T + b, t)
    got = linear_cross_entropy(x, w, t, b, chunk=8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, bb in zip(torch.autograd.grad(got, [x, b]), torch.autograd.grad(ref, [x, b])):
        torch.testing.assert_close(a, bb, rtol=1e-4, atol=1e-6)


def test_mntp_loss_on_real_causal_lm_matches_hf(tiny_causal_lm_dir):
    """Through the bidirectional causal LM: our gathered loss == HF full-logits loss."""
    from transformers import AutoModelForCausalLM

    from llm2vec_fast.bidirectional import decoder_of, enable_bidirectional

    lm = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    enable_bidirectional(lm)
    ids, attn = _batch(b=4, length=24, seed=7)
    inputs, labels = mask_tokens(ids, attn, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, generator=torch.Generator().manual_seed(0))
    hidden = decoder_of(lm)(input_ids=inputs, attention_mask=attn).last_hidden_state
    ours = mntp_loss(hidden, labels, lm.get_output_embeddings(), chunk=16)
    ref = _hf_style_loss(hidden, labels, lm.get_output_embeddings())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [1.0, 3.0])
def test_linear_cross_entropy_applies_final_logit_softcapping(softcap):
    """Gemma2's ``final_logit_softcapping``: loss and gradients equal full logits capped by
    ``c * tanh(z / c)``; the cap is small enough that it changes the loss."""
    torch.manual_seed(2)
    x = torch.randn(29, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 2).requires_grad_()
    t = torch.randint(0, 300, (29,))
    z = x @ w.T
    ref = F.cross_entropy(softcap * torch.tanh(z / softcap), t)
    got = linear_cross_entropy(x, w, t, chunk=8, softcap=softcap)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, [x, w]), torch.autograd.grad(ref, [x, w])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(got.item() - F.cross_entropy(z, t).item()) > 0.1
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(x, w, t, softcap=0.0)


def test_mntp_loss_on_gemma2_matches_its_capped_lm_head():
    """The MNTP loss of a Gemma2 causal LM equals cross-entropy over the logits the model itself
    returns (which apply final_logit_softcapping)."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from llm2vec_fast.bidirectional import decoder_of, enable_bidirectional
    from llm2vec_fast.train.mntp import final_logit_softcap

    torch.manual_seed(0)
    config = tiny_config(
        "gemma2", vocab_size=500, attn_logit_softcapping=2.0, final_logit_softcapping=1.5, tie_word_embeddings=True, initializer_range=0.5
    )  # logits large enough to reach the cap
    lm = enable_bidirectional(AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval())
    assert final_logit_softcap(lm.config) == 1.5
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3::2] = ids[:, 3::2]
    hidden = decoder_of(lm)(input_ids=ids).last_hidden_state
    ours = mntp_loss(hidden, labels, lm.get_output_embeddings(), chunk=5, softcap=final_logit_softcap(lm.config))
    logits = lm(input_ids=ids).logits  # capped by the model
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 500), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    uncapped = mntp_loss(hidden, labels, lm.get_output_embeddings(), chunk=5)
    assert abs(uncapped.item() - ref.item()) > 1e-2
