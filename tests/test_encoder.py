"""LLM2Vec.encode contract on the embedded default model and tiny checkpoints."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec


def assert_same_embeddings(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to fp32 noise: SmolLM2 has outlier dimensions of magnitude ~20."""
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    assert cos.min() > 1 - 1e-6, cos
    assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()) * 10


TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion.", "Stocks fell sharply on Monday."]


def test_default_model_encodes_in_input_order(default_encoder):
    out = default_encoder.encode(TEXTS)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 576)
    reversed_out = default_encoder.encode(TEXTS[::-1], batch_size=2)
    assert_same_embeddings(reversed_out.flip(0), out)
    for i, text in enumerate(TEXTS):
        assert_same_embeddings(default_encoder.encode([text])[0], out[i])


def test_output_types_and_normalization(default_encoder):
    arr = default_encoder.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, rtol=1e-5)
    both = default_encoder.encode(TEXTS, convert_to_numpy=True, convert_to_tensor=True)
    assert isinstance(both, torch.Tensor)
    single = default_encoder.encode("just one sentence")
    assert single.shape == (576,)


def test_instruction_is_attended_but_not_pooled(default_encoder):
    text = "A man is playing a guitar."
    instruction = "Retrieve semantically similar text:"
    item = default_encoder.tokenize([[instruction, text]])[0]
    n_text = len(default_encoder.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert item.num_pooled == n_text
    assert len(item.input_ids) > n_text
    plain = default_encoder.encode([text])[0]
    with_instr = default_encoder.encode([[instruction, text]])[0]
    assert not torch.allclose(plain, with_instr, atol=1e-3), "instruction tokens must be attended to"
    default_encoder.skip_instruction = False
    try:
        assert default_encoder.tokenize([[instruction, text]])[0].num_pooled == len(item.input_ids)
    finally:
        default_encoder.skip_instruction = True


def test_eos_token_pooling_appends_real_eos(default_model_dir):
    enc = LLM2Vec.from_pretrained(default_model_dir, pooling_mode="eos_token", max_length=8)
    items = enc.tokenize(["hello world", "word " * 50])
    for item in items:
        assert item.input_ids[-1] == enc.tokenizer.eos_token_id
        assert len(item.input_ids) <= 8
    out = enc.encode(["hello world"])
    assert torch.isfinite(out).all()


def test_empty_strings_embed_without_nan(default_encoder):
    out = default_encoder.encode(["", "   ", "text", ["Instruction:", ""]])
    assert torch.isfinite(out).all()
    assert out.abs().sum(dim=1).gt(0).all()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([], ValueError, "empty list"),
        ([1, 2], TypeError, "sentences\\[0\\]"),
        (["ok", None], TypeError, "sentences\\[1\\]"),
        ([["instr", "text", "extra"]], TypeError, "pair"),
        (42, TypeError, "list of strings"),
    ],
)
def test_bad_input_raises_clear_error(default_encoder, bad, error, match):
    with pytest.raises(error, match=match):
        default_encoder.encode(bad)


def test_bad_batch_size(default_encoder):
    with pytest.raises(ValueError, match="batch_size"):
        default_encoder.encode(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        default_encoder.encode(TEXTS, batch_size=2.0)


def test_array_like_inputs_as_in_sentence_transformers(default_encoder):
    """A numpy array or pandas Series of texts (or an [n, 2] array of pairs), and a numpy integer
    batch size, encode like the list."""
    import numpy as np

    expected = default_encoder.encode(TEXTS, convert_to_numpy=True)
    for given in (np.array(TEXTS), np.array(TEXTS, dtype=object)):
        np.testing.assert_allclose(default_encoder.encode(given, batch_size=np.int64(2), convert_to_numpy=True), expected, atol=1e-4)
    pairs = [["Represent:", t] for t in TEXTS]
    np.testing.assert_allclose(
        default_encoder.encode(np.array(pairs), convert_to_numpy=True), default_encoder.encode(pairs, convert_to_numpy=True), atol=1e-4
    )
    pandas = pytest.importorskip("pandas")
    np.testing.assert_allclose(default_encoder.encode(pandas.Series(TEXTS), convert_to_numpy=True), expected, atol=1e-4)
    assert default_encoder.encode(np.array("one text")).shape == (expected.shape[1],)  # 0-d: a single string


def test_unknown_pooling_mode_and_missing_path(default_model_dir, tmp_path):
    with pytest.raises(ValueError, match="pooling_mode"):
        LLM2Vec.from_pretrained(default_model_dir, pooling_mode="max")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM2Vec.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM2Vec.from_pretrained("./relative/missing")


def test_truncation_warns_once(default_model_dir, caplog):
    enc = LLM2Vec.from_pretrained(default_model_dir, max_length=16)
    with caplog.at_level(logging.WARNING, logger="llm2vec_fast"):
        enc.encode(["word " * 100])
        enc.encode(["other " * 100])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1
    assert all(len(x.input_ids) <= 16 for x in enc.tokenize(["word " * 100]))


def test_doc_max_length_trims_words(default_model_dir):
    enc = LLM2Vec.from_pretrained(default_model_dir, doc_max_length=20)
    item = enc.tokenize([["Represent this:", "lorem ipsum dolor sit amet " * 30]])[0]
    assert item.num_pooled <= 20


def test_save_and_reload_roundtrip(default_encoder, tmp_path):
    default_encoder.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "llm2vec_config.json").read_text())
    assert config["pooling_mode"] == "mean" and config["max_length"] == 512
    reloaded = LLM2Vec.from_pretrained(str(tmp_path / "saved"))
    assert_same_embeddings(reloaded.encode(TEXTS), default_encoder.encode(TEXTS))


def test_llm2vec_config_is_honoured_and_overridable(tiny_llama_dir):
    with open(f"{tiny_llama_dir}/llm2vec_config.json", "w") as f:
        json.dump({"pooling_mode": "weighted_mean", "max_length": 64}, f)
    try:
        enc = LLM2Vec.from_pretrained(tiny_llama_dir)
        assert enc.pooling_mode == "weighted_mean" and enc.max_length == 64
        assert LLM2Vec.from_pretrained(tiny_llama_dir, pooling_mode="mean").pooling_mode == "mean"
    finally:
        import os

        os.remove(f"{tiny_llama_dir}/llm2vec_config.json")


def test_dtype_default_is_fp32_on_cpu(default_encoder):
    assert next(default_encoder.model.parameters()).dtype == torch.float32


def test_loading_names_dtypes_tokenizers_and_local_folders(tiny_llama_dir, tmp_path, monkeypatch):
    """dtype names ("bf16", "torch.float16"), a folder without a tokenizer, and a local folder named
    like the embedded model (it is loaded, not the embedded one)."""
    import shutil

    assert LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", dtype="bf16").model.dtype == torch.bfloat16
    assert LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", dtype="torch.float16").model.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", dtype="int8")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special*"))
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        LLM2Vec.from_pretrained(str(no_tokenizer), device="cpu")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama_dir, tmp_path / "SmolLM2-135M-Instruct")
    local = LLM2Vec.from_pretrained("SmolLM2-135M-Instruct", device="cpu")
    assert local.hidden_size == LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu").hidden_size != 576


def test_hub_checkpoint_settings_and_tokenizer_follow_hf_kwargs(tiny_llama_dir, tmp_path):
    """A hub id (here from a local cache, offline): its llm2vec_config.json settings apply, and
    cache_dir reaches the tokenizer too (it was loaded from the default cache only)."""
    import json
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--fake-org--enc"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    stored = {"pooling_mode": "last_token", "max_length": 64, "skip_instruction": False}
    (repo / "snapshots" / revision / "llm2vec_config.json").write_text(json.dumps(stored))
    encoder = LLM2Vec.from_pretrained("fake-org/enc", device="cpu", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    assert (encoder.pooling_mode, encoder.max_length, encoder.skip_instruction) == ("last_token", 64, False)


def test_a_hub_id_that_cannot_load_says_how_to_skip_the_hub_retries(monkeypatch):
    """A hub id that is no local folder and does not load names the folder it was looked up from,
    the hub's error, and, unless the hub is already off, HF_HUB_OFFLINE=1 / local_files_only=True
    (the hub client otherwise retries the connection for about 50 s on a machine without internet)."""
    import huggingface_hub.constants
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match="no local folder") as err:
        LLM2Vec.from_pretrained("someone/no-such-encoder", device="cpu")
    assert "couldn't connect" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    with pytest.raises(OSError, match="no local folder") as err:
        LLM2Vec.from_pretrained("someone/no-such-encoder", device="cpu", local_files_only=True)
    assert "HF_HUB_OFFLINE" not in str(err.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="no local folder") as err:
        LLM2Vec.from_pretrained("someone/no-such-encoder", device="cpu")
    assert "HF_HUB_OFFLINE" not in str(err.value)
