"""Tokenizers: the library pads and truncates on the right itself, uses EOS when there is no pad
token, never changes the caller's tokenizer, and training stages give the same batches, losses and
gradients for left- and right-padding tokenizers. Inputs above ``max_position_embeddings`` are
truncated with a warning."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModel, AutoTokenizer

from llm2vec_fast import LLM2Vec, enable_bidirectional
from llm2vec_fast.tokenization import padding_tokenizer
from llm2vec_fast.train import STAGE_CLASSES, make_config

SENTENCES = [f"sentence number {i} is about {w} and a few more words." for i, w in enumerate(["cats", "dogs", "rain", "tea"] * 3)]
SENTENCES[3] = "a much longer sentence with many more tokens than the others so that padding is needed " * 2


def _user_tokenizer(tok, side: str):
    tok = copy.deepcopy(tok)
    tok.padding_side = tok.truncation_side = side
    tok.pad_token = None
    return tok


def test_padding_tokenizer_copies_and_sets_up(smollm_tokenizer):
    user = _user_tokenizer(smollm_tokenizer, "left")
    tok = padding_tokenizer(user)
    assert tok is not user
    assert (tok.padding_side, tok.truncation_side, tok.pad_token) == ("right", "right", user.eos_token)
    assert (user.padding_side, user.truncation_side, user.pad_token) == ("left", "left", None)
    batch = tok(["a b c d e", "a"], padding=True)
    assert batch["attention_mask"][1][0] == 1 and batch["attention_mask"][1][-1] == 0  # right padding
    no_eos = copy.deepcopy(user)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="pad token"):
        padding_tokenizer(no_eos)


def test_encoder_never_mutates_the_callers_tokenizer(smollm_tokenizer):
    user = _user_tokenizer(smollm_tokenizer, "left")
    torch.manual_seed(0)
    enc = LLM2Vec(enable_bidirectional(AutoModel.from_config(tiny_config("llama")).eval()), user)
    out = enc.encode(["short", "a longer text that needs no padding at all"])
    assert torch.isfinite(out).all()
    assert (user.padding_side, user.truncation_side, user.pad_token) == ("left", "left", None)
    assert enc.tokenizer is not user and enc.tokenizer.pad_token_id == user.eos_token_id
    right = LLM2Vec(enc.model, _user_tokenizer(smollm_tokenizer, "right"))
    torch.testing.assert_close(right.encode(["short", "a longer text that needs no padding at all"]), out, atol=0, rtol=0)


def test_onnx_encoder_never_mutates_the_callers_tokenizer(smollm_tokenizer):
    pytest.importorskip("onnxruntime")
    from llm2vec_fast.export import OnnxEncoder

    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    user = _user_tokenizer(smollm_tokenizer, "left")
    settings = dict(pooling_mode="mean", max_length=64, doc_max_length=64, skip_instruction=True)
    enc = OnnxEncoder(Session(), user, settings, model_id=None, hidden_size=8)
    assert (user.padding_side, user.pad_token) == ("left", None)
    assert enc.tokenizer.pad_token_id == user.eos_token_id and enc.tokenizer.padding_side == "right"


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory, smollm_tokenizer):
    """A tiny causal LM (head dim 32, which the packed kernel takes) saved twice: with a left-padding /
    left-truncating tokenizer without a pad token (as Llama / Gemma tokenizers come in transformers 5),
    and with a right-padding one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("llama", head_dim=32, tie_word_embeddings=True))
    out = {}
    for side in ("left", "right"):
        path = tmp_path_factory.mktemp(f"lm-{side}")
        lm.save_pretrained(path)
        _user_tokenizer(smollm_tokenizer, side).save_pretrained(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.update(padding_side=side, truncation_side=side)  # transformers 5 does not save them itself
        config_file.write_text(json.dumps(config))
        out[side] = str(path)
    loaded = AutoTokenizer.from_pretrained(out["left"])
    assert (loaded.padding_side, loaded.truncation_side, loaded.pad_token) == ("left", "left", None)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "s.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return str(path)


def _stage_step(stage_name: str, model: str, data: str, out, **kw):
    values = dict(
        model=model,
        data=data,
        output_dir=str(out),
        batch_size=len(SENTENCES),
        max_length=32,
        device="cpu",
        progress=False,
        lora_dropout=0.0,
        micro_batch_size=5,
    )
    values.update(kw)
    if stage_name != "mntp":
        values["attention_dropout"] = 0.0
    stage = STAGE_CLASSES[stage_name](make_config(stage_name, values), torch.device("cpu"))
    schedule = stage.load_data()
    torch.manual_seed(0)
    stage.build()
    stage.wrap_ddp()
    loss, n_tokens = stage.step(schedule.batch(0))
    grads = {n: p.grad.clone() for n, p in stage.trainable_parameters().items()}
    return stage, float(loss), n_tokens, grads


@pytest.mark.parametrize("stage_name,layout", [("mntp", "padded"), ("mntp", "packed"), ("simcse", "padded"), ("simcse", "packed")])
def test_stage_loss_and_gradients_do_not_depend_on_padding_side(stage_name, layout, lm_dirs, text_file, tmp_path):
    results = {}
    for side, model in lm_dirs.items():
        results[side] = _stage_step(stage_name, model, text_file, tmp_path / side, batch_layout=layout)
    (left, l_loss, l_tokens, l_grads), (_, r_loss, r_tokens, r_grads) = results["left"], results["right"]
    tok = left.tokenizer if stage_name == "mntp" else left.encoder.tokenizer
    assert (tok.padding_side, tok.truncation_side) == ("right", "right")
    assert l_tokens == r_tokens
    assert abs(l_loss - r_loss) <= 1e-6 * max(1.0, abs(r_loss))
    assert l_grads.keys() == r_grads.keys() and l_grads
    for name in l_grads:
        torch.testing.assert_close(l_grads[name], r_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_mntp_batch_rows_hold_the_real_tokens_first(lm_dirs, text_file, tmp_path):
    stage, *_ = _stage_step("mntp", lm_dirs["left"], text_file, tmp_path, max_steps=1)
    b = stage.batch(list(range(len(SENTENCES))), 0)
    lengths = b["attention_mask"].sum(1)
    for row, n in zip(b["attention_mask"], lengths):
        assert row[: int(n)].all() and not row[int(n) :].any()


# ---------------------------------------------------------------- long inputs
LONG = "word " * 300


@pytest.mark.parametrize("packed", [False, True])
def test_inputs_above_max_position_embeddings_are_truncated_with_a_warning(smollm_tokenizer, packed, caplog):
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("llama", head_dim=32, max_position_embeddings=32)).eval()
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast"):
        enc = LLM2Vec(enable_bidirectional(model), smollm_tokenizer, max_length=512, packed=packed)
        out = enc.encode([LONG, "short"])
    assert enc.max_length == 32
    assert "max_position_embeddings=32" in caplog.text and "truncated" in caplog.text
    assert max(len(x.input_ids) for x in enc.tokenize([LONG])) == 32
    assert torch.isfinite(out).all()
    # the truncated text embeds like its first 32 tokens
    head = enc.tokenize([LONG])[0].input_ids
    torch.testing.assert_close(out[0], enc.encode([smollm_tokenizer.decode(head, skip_special_tokens=True)])[0], atol=1e-5, rtol=1e-4)


def test_mntp_truncates_at_max_position_embeddings(tmp_path, smollm_tokenizer, text_file, caplog):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "short-lm"
    AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=16, tie_word_embeddings=True)).save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast"):
        stage, loss, n_tokens, _ = _stage_step("mntp", str(path), text_file, tmp_path / "o", max_length=64)
    assert "max_position_embeddings=16" in caplog.text
    assert stage.batch(list(range(len(SENTENCES))), 0)["input_ids"].shape[1] <= 16
    assert n_tokens <= 16 * len(SENTENCES) and loss == loss


@pytest.mark.parametrize("append_eos", [False, True])
def test_truncation_flag_is_exact_at_the_budget(smollm_tokenizer, append_eos):
    """An input that fills the token budget exactly is not truncated; one token more is (whatever
    the tokenizers release fills into ``Encoding.overflowing``)."""
    from llm2vec_fast.prompting import prepare_inputs

    text = "The quick brown fox jumps over the lazy dog near the river bank."
    n = len(smollm_tokenizer(text, add_special_tokens=True)["input_ids"])  # no instruction, no chat wrap: the text alone
    settings = dict(doc_max_length=10_000, skip_instruction=True, model_id=None, append_eos=append_eos)
    fits, cut = (
        prepare_inputs(smollm_tokenizer, [("", text), ("", "short")], max_length=n + append_eos + extra, **settings) for extra in (0, -1)
    )
    assert [x.truncated for x in fits] == [False, False]
    assert [x.truncated for x in cut] == [True, False]
    assert len(fits[0].input_ids) == n + append_eos and len(cut[0].input_ids) == n - 1 + append_eos


def test_truncation_without_overflow_information(smollm_tokenizer):
    """Where the tokenizer reports no overflow (slow tokenizers; fast ones of some releases), rows at
    the budget are re-tokenized: the same answer as from ``Encoding.overflowing``."""
    from llm2vec_fast.prompting import _truncated_rows

    texts = ["word " * 40, "short text", "The quick brown fox jumps over the lazy dog."]
    exact = len(smollm_tokenizer(texts[2])["input_ids"])
    batch = smollm_tokenizer(texts, truncation=True, max_length=exact)
    with_overflow = _truncated_rows(smollm_tokenizer, texts, batch["input_ids"], batch.encodings, exact)
    assert with_overflow == _truncated_rows(smollm_tokenizer, texts, batch["input_ids"], None, exact) == {0}


@pytest.mark.parametrize("fast", [True, False])
def test_doc_max_length_cuts_a_text_without_spaces_by_tokens(smollm_tokenizer, fast):
    """A long text with no word to drop (Chinese, a URL, code) keeps its first ``doc_max_length``
    tokens: the official word loop leaves it empty (it then embeds as ""). Texts with words are
    trimmed by words as before, and every trimmed text is flagged (the encoder warns once)."""
    from llm2vec_fast.prompting import prepare_inputs, trim_to_doc_max_length

    class WithoutOffsets:  # what a slow tokenizer offers: no character offsets, so the tokens are decoded
        is_fast = False

        def __call__(self, *args, **kwargs):
            return smollm_tokenizer(*args, **kwargs)

        def decode(self, ids):
            return smollm_tokenizer.decode(ids)

    tokenizer = smollm_tokenizer if fast else WithoutOffsets()
    chinese = "我们在河边散步，天气很好，孩子们在草地上玩耍。" * 40
    url = "https://example.com/search?" + "&".join(f"key{i}=value{i}" for i in range(300))
    for text in (chinese, url, "lead " + chinese):
        cut, trimmed = trim_to_doc_max_length(tokenizer, text, 50, 512)
        n = len(tokenizer(cut, add_special_tokens=False)["input_ids"])
        assert trimmed and 45 <= n <= 50 and text.startswith(cut), (n, cut[:40])
    words = "lorem ipsum dolor sit amet " * 30
    cut, trimmed = trim_to_doc_max_length(tokenizer, words, 50, 512)
    assert trimmed and words.startswith(cut) and cut.split() == words.split()[: len(cut.split())]
    assert trim_to_doc_max_length(tokenizer, "short text", 50, 512) == ("short text", False)
    settings = dict(max_length=512, doc_max_length=50, skip_instruction=True, model_id=None, append_eos=False)
    items = prepare_inputs(smollm_tokenizer, [("", chinese), ("", "short text")], **settings)
    assert [x.truncated for x in items] == [True, False] and items[0].num_pooled >= 45


def test_doc_max_length_trimming_warns(smollm_tokenizer, caplog):
    """Trimming a text to ``doc_max_length`` (under ``max_length``) is a truncation too: one warning."""
    encoder = LLM2Vec(AutoModel.from_config(tiny_config("llama")), smollm_tokenizer, doc_max_length=8, max_length=64)
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast"):
        encoder.encode(["short", "a text of rather more than eight tokens, to be trimmed by words"], batch_size=2)
        encoder.encode(["another text of rather more than eight tokens, trimmed again"])
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "doc_max_length=8" in warnings[0]


def test_instruction_with_the_separator_and_inputs_cut_at_max_length(smollm_tokenizer):
    """An instruction may hold the separator itself (it was split there: part of the instruction
    went into the pooled text and the separator into the input); an input cut at max_length pools
    what is left of its text, not the instruction tokens the official end-counted span reaches."""
    from llm2vec_fast.prompting import SEPARATOR, prepare_inputs

    settings = dict(doc_max_length=400, skip_instruction=True, model_id=None, append_eos=False)
    tok = smollm_tokenizer
    item = prepare_inputs(tok, [(f"Find text like this {SEPARATOR} and rank it", "How do plants grow?")], max_length=512, **settings)[0]
    assert tok.decode(item.input_ids).count(SEPARATOR) == 1  # the instruction's own, kept
    assert tok.decode(item.input_ids[-item.num_pooled :]) == " How do plants grow?"
    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    n_head = len(tok(instruction + " ", add_special_tokens=True)["input_ids"])
    long_text, cut_away = prepare_inputs(tok, [(instruction, "word " * 200), ("x " * 600, "the text")], max_length=64, **settings)
    assert long_text.truncated and len(long_text.input_ids) == 64 and long_text.num_pooled == 64 - n_head
    assert "Given" not in tok.decode(long_text.input_ids[-long_text.num_pooled :])
    assert cut_away.truncated and cut_away.num_pooled == 64  # no text left: pooled like an empty text
