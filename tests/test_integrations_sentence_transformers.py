"""sentence-transformers 6: ``LLM2Vec.save(path, format="sentence-transformers")`` loads with
``SentenceTransformer(path, trust_remote_code=True)`` and encodes exactly as ``LLM2Vec.encode``."""

from __future__ import annotations

import json

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.integrations.sentence_transformers import DEFAULT_PROMPTS, MODULE_CLASS, LLM2VecModule  # noqa: E402

TEXTS = [
    "A man is playing a guitar.",
    "x",
    "The committee met on Tuesday to review the proposal for the new public library on the main square.",
    "Dogs run.",
    "",
]
INSTRUCTION = "Retrieve semantically similar text:"
MIN_COS = 0.99999


def _cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float()).min().item()


@pytest.fixture(scope="module")
def saved(default_encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model"
    default_encoder.save(path, format="sentence-transformers", prompts={**DEFAULT_PROMPTS, "sts": INSTRUCTION})
    return path


@pytest.fixture(scope="module")
def st_model(saved):
    return SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")


def test_folder_layout_holds_no_code(saved):
    assert json.loads((saved / "modules.json").read_text()) == [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}]
    config = json.loads((saved / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["sts"] == INSTRUCTION and config["prompts"]["document"] == ""
    assert config["similarity_fn_name"] == "cosine" and config["default_prompt_name"] is None
    assert not list(saved.rglob("*.py"))
    assert (saved / "model.safetensors").is_file() and (saved / "llm2vec_config.json").is_file()


def test_needs_trust_remote_code(saved):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(saved), device="cpu")


def test_embeddings_equal_llm2vec_encode(default_encoder, st_model):
    assert isinstance(st_model[0], LLM2VecModule)
    assert st_model.get_embedding_dimension() == default_encoder.hidden_size
    assert st_model.max_seq_length == default_encoder.max_length and st_model.similarity_fn_name == "cosine"
    # without instruction, single and batched
    assert _cos(st_model.encode(TEXTS, convert_to_tensor=True), default_encoder.encode(TEXTS)) >= MIN_COS
    assert _cos(st_model.encode(TEXTS, batch_size=1, convert_to_tensor=True), default_encoder.encode(TEXTS)) >= MIN_COS
    one = st_model.encode(TEXTS[0])
    assert one.shape == (576,) and _cos(one[None], default_encoder.encode(TEXTS[:1])) >= MIN_COS
    # with the instruction, as a saved prompt and as a free prompt: instruction tokens not pooled
    expected = default_encoder.encode([[INSTRUCTION, t] for t in TEXTS])
    assert _cos(st_model.encode(TEXTS, prompt_name="sts", convert_to_tensor=True), expected) >= MIN_COS
    assert _cos(st_model.encode(TEXTS, prompt=INSTRUCTION, convert_to_tensor=True), expected) >= MIN_COS
    assert _cos(st_model.encode(TEXTS, convert_to_tensor=True), expected) < 0.9999  # the instruction does change them
    # query / document helpers: queries get the "query" instruction, documents none
    query = default_encoder.encode([[DEFAULT_PROMPTS["query"], t] for t in TEXTS])
    assert _cos(st_model.encode_query(TEXTS, convert_to_tensor=True), query) >= MIN_COS
    assert _cos(st_model.encode_document(TEXTS, convert_to_tensor=True), default_encoder.encode(TEXTS)) >= MIN_COS


def test_bidirectional_and_instruction_out_of_pooling(default_encoder, st_model):
    from llm2vec_fast.bidirectional import is_bidirectional

    assert is_bidirectional(st_model[0].encoder.model)
    # pooled span: only the text tokens (what LLM2Vec.tokenize says), not the instruction's
    features = st_model[0].preprocess(["A man is playing a guitar."], prompt=INSTRUCTION)
    item = default_encoder.tokenize([[INSTRUCTION, "A man is playing a guitar."]])[0]
    assert features["input_ids"][0].tolist() == item.input_ids
    assert int(features["pool_mask"].sum()) == item.num_pooled < len(item.input_ids)


def test_causal_encoder_is_refused(tiny_llama_dir, tmp_path):
    causal = LLM2Vec.from_pretrained(tiny_llama_dir, enable_bidirectional=False, device="cpu")
    with pytest.raises(ValueError, match="causal"):
        causal.save(tmp_path / "never-written", format="sentence-transformers")
    assert not (tmp_path / "never-written").exists()


def test_sentence_transformers_precision_and_truncation_match_ours(default_encoder, st_model):
    texts = TEXTS[:4] * 3
    for precision in ("int8", "ubinary"):
        theirs = st_model.encode(texts, precision=precision, truncate_dim=64, normalize_embeddings=True)
        ours = default_encoder.encode(texts, precision=precision, truncate_dim=64, normalize_embeddings=True).numpy()
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
        assert (theirs.astype(int) - ours.astype(int)).__abs__().max() <= 1  # same floats up to ~1e-7


def test_nothing_from_the_folder_is_executed(saved, tmp_path):
    """A Python file planted in the folder under any name the class path could resolve to never runs."""
    import shutil

    folder = tmp_path / "planted"
    shutil.copytree(saved, folder)
    marker = tmp_path / "executed"
    for name in ("llm2vec_fast.py", "integrations.py", "sentence_transformers.py", "LLM2VecModule.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    model.encode(["hello"])
    assert not marker.exists()


def test_save_and_reload_round_trip(st_model, default_encoder, tmp_path):
    """``SentenceTransformer.save`` of a loaded model writes a folder that loads again."""
    st_model.save(str(tmp_path / "again"))
    again = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    assert _cos(again.encode(TEXTS, convert_to_tensor=True), default_encoder.encode(TEXTS)) >= MIN_COS
    assert again.prompts["sts"] == INSTRUCTION


def test_bad_arguments(default_encoder, tmp_path):
    with pytest.raises(ValueError, match="unknown save format"):
        default_encoder.save(tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="default_prompt_name"):
        default_encoder.save(tmp_path / "y", format="sentence-transformers", default_prompt_name="nope")
    with pytest.raises(ValueError, match="prompts are saved with format"):
        default_encoder.save(tmp_path / "z", prompts={"q": "x"})
    with pytest.raises(TypeError, match="string"):
        LLM2VecModule(default_encoder).preprocess([["instruction", "text"]])


def test_cli_export_sentence_transformers(tiny_llama_dir, tmp_path, capsys):
    from llm2vec_fast.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"query": "Find the answer:", "document": ""}))
    out = tmp_path / "st-tiny"
    assert main(["export", "--format", "sentence-transformers", "--model", tiny_llama_dir, "-o", str(out), "--prompts", str(prompts)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().err
    model = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")
    assert model.prompts["query"] == "Find the answer:"
    assert _cos(model.encode_query(TEXTS, convert_to_tensor=True), encoder.encode([["Find the answer:", t] for t in TEXTS])) >= MIN_COS
    assert main(["export", "--format", "sentence-transformers", "--model", tiny_llama_dir, "-o", str(out)]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
