"""MTEB 2 integration: ``MTEBEncoder`` (EncoderProtocol) on local tasks built in the tests (nothing is
downloaded), the LLM2Vec instruction convention, and ``llm2vec-fast eval mteb``."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models import EncoderProtocol  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.integrations.instructions import LLM2VEC_TASK_INSTRUCTIONS  # noqa: E402
from llm2vec_fast.integrations.mteb import MTEBEncoder, TaskDataMissingError, load_task_data, run_mteb  # noqa: E402
from llm2vec_fast.stsb import stsb_spearman  # noqa: E402

CLI = "import sys; from llm2vec_fast.cli import main; sys.exit(main())"
# 40 pairs of STS-B dev (every 38th), score in [0, 5]
STS_PAIRS = [
    ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
    ("A man is eating food.", "A man is eating something.", 4.2),
    ("The man talked to a girl over the internet camera.", "A teenager talks to a girl over a webcam.", 2.8),
    ("The elephants are bathing.", "Two women are singing.", 0.0),
    ("A man is playing guitar.", "A man plays a guitar.", 4.857),
    ("A child runs into and out of the ocean waves.", "A young boy is running toward and from the ocean waves.", 3.8),
    ("Someone is mixing a liquid.", "A man is playing a guitar.", 0.0),
    (
        "The udders of a dairy cow that is standing in a pasture near a large building.",
        "The black and brown cow is standing on the green grass.",
        2.0,
    ),
    (
        "Two boys sit facing one another at a table and one points at the other.",
        "Two people sit facing each other at a table as one points at the other.",
        4.4,
    ),
    ("A man with glasses and two plastic bottles in the foreground.", "A man talking with two water bottles sitting in front of him.", 3.0),
    ("A man in a dress suit is riding a bike down the paved road.", "A man is using a large pole to remove letters from a sign.", 0.2),
    ("A woman and a man are amused by headphones.", "A man and a woman resting after exercise.", 1.2),
    ("A dog and cat laying down together.", "Two grey dogs are carrying a stick in the water.", 0.6),
    ("The black and white dog is running on the grass.", "A black and white dog swims in blue water.", 1.4),
    ("man on steps", "A man sits on steps.", 4.0),
    ("Some smiling children are standing in front of an ocean sunset.", "People walking in the dark.", 0.6),
    ("The two men are wearing jeans.", "The two men are wearing pants.", 4.4),
    (
        "All we know is this : Distant objects are receding from us at a rate proportional to their distance from us.",
        "The expansion of space means that objects in cosmological distances are receding away from each other.",
        3.4,
    ),
    (
        "Break the bulb into cloves, breaking off the bottom and the dry stick that goes up the middle.",
        "lay down a knife horizontaly on the cloves and hit it.",
        1.6,
    ),
    (
        "I recently stumbled on a great article that talks about protein consumption for the purposes of building muscle (recovery included).",
        "Low reps with high weights don't add mass because the duration of the exercise is kept short.",
        1.0,
    ),
    (
        "Looks like you've rediscovered Jaspers's concept of the Axial Age.",
        "There was no influence from China to the culture of Greece.",
        0.4,
    ),
    (
        "If you wear a bear bell on your backpack, your fellow hikers will kill you for being annoying.",
        "The above advice is quite good, just wanted to add on thing to consider regarding food in bear country.",
        0.6,
    ),
    (
        "Try switching to rats; weanling rats if you need something smaller.",
        "As mentioned in previous answers, rats and gerbils can be offered instead of mice or in a rotation with mice.",
        3.4,
    ),
    (
        "Same here, I've the 50mm f/1.4, and as my fastest lens I couldn't live without it for concerts and low-light photography.",
        "I have the 18-55, 50/1.8 and 50/1.4 as well as the 20D - superseded by a 50D.",
        2.6,
    ),
    (
        'The user needs to evaluate for his/herself the cost/benefit of an "obvious" efficiency tool, such as macros.',
        "Instead of trying to force specific answers or method's on them.",
        0.8,
    ),
    (
        "Yes, dew (wetness in the environment) factor can change the direction of a match.",
        "Another disadvantage of the dew factor is that it makes hitting boundaries difficult.",
        3.0,
    ),
    (
        "Your worry is a valid one; the reader could be frustrated by this.",
        "I don't believe not knowing a character's name would be confusing unless you make it so.",
        1.4,
    ),
    ('"Frank Quattrone is innocent," Keker said in a statement.', "Quattrone lawyer John W. Keker said his client is innocent.", 3.75),
    (
        "But price declines have remained below 30 percent, year over year, for the last two quarters, said IDC analyst John McArthur.",
        "McArthur told internetnews.com price declines have moderated and remained below 30 percent from the previous year for the last two quarters.",
        3.75,
    ),
    (
        "But in the end, all the worm did was visit a pornography site, said Vincent Weafer, a security director with Symantec Security Response in California.",
        "But Vincent Weafer, security director with Symantec Security Response, said all the virus did was visit a pornography site.",
        4.8,
    ),
    (
        "The first health-care worker in the country to die of SARS was a Filipina-Canadian who contracted the disease at North York General Hospital, the site of the second outbreak.",
        "Emile Laroza, 51, contracted SARS while working as a nurse at North York General Hospital, the epicentre of the second SARS outbreak.",
        3.25,
    ),
    (
        'From Broadway comedies like "The Seven Year Itch" (1952), "Will Success Spoil Rock Hunter?"',
        "Playwright George Axelrod, who anticipated the sexual revolution with The Seven Year Itch and Will Success Spoil Rock Hunter?",
        2.0,
    ),
    (
        "That took the benchmark 10-year note US10YT=RR down 9/32, its yield rising to 3.37 percent from 3.34 percent late on Thursday.",
        "That saw the benchmark 10-year note US10YT=RR slip 5/32 in price, taking its yield to 3.36 percent from 3.34 percent late on Thursday.",
        3.417,
    ),
    ("Saudi gas truck blast kills at least 22", "Nigeria church blast kills at least 12", 0.6),
    ("At CPAC, Mitt Romney Stresses Conservative Credentials", "CPAC 2012: Mitt Romney Struggles to Connect with Conservative Base", 3.2),
    ("Iraq Releases Suspected Hezbollah Operative Wanted By U.S.", "Iraq Said to Release Hezbollah Operative", 3.2),
    ("North Korea Nuclear Test Sparks Worry", "North Korea nuclear test", 2.4),
    ("Matt Smith quits BBC‚Äôs Doctor Who", "Matt Smith quits BBC's Doctor Who", 5.0),
    ("Syria opposition unity take face specter of collapse", "Syria divided opposition struggles within wider Syrian struggle", 2.2),
    ("Chinese lunar rover lands on moon", "China lands robot rover on moon", 5.0),
]
RETRIEVAL_INSTRUCTION = "Given a question, retrieve the passage that answers it:"
TOPICS = ["guitar", "onion", "stock market", "football", "volcano", "bread", "satellite", "violin"]
QUERIES = {f"q{i}": f"What do people say about the {t}?" for i, t in enumerate(TOPICS)}
CORPUS = {
    f"d{i}-{j}": text
    for i, t in enumerate(TOPICS)
    for j, text in enumerate(
        [f"A short note about the {t}.", f"Everyone talks about the {t} these days.", f"The {t} was in the news again."]
    )
}
RELEVANT = {f"q{i}": {f"d{i}-0": 1, f"d{i}-1": 1} for i in range(len(TOPICS))}


def _metadata(name: str, task_type: str, main_score: str) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description="built by the llm2vec-fast tests",
        reference=None,
        dataset={"path": "local", "revision": "1"},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=main_score,
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
    )


class LocalSTSB(AbsTaskSTS):
    """STS from an STS-B format folder on disk (sts-dev.csv), as ``llm2vec-fast eval sts`` reads it."""

    metadata = _metadata("LocalSTSB", "STS", "cosine_spearman")
    data_dir = None

    def load_data(self, **kwargs):
        from llm2vec_fast.stsb import load_stsb

        rows = load_stsb("dev", self.data_dir)
        columns = {"sentence1": [a for a, _, _ in rows], "sentence2": [b for _, b, _ in rows], "score": [s for _, _, s in rows]}
        self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
        self.data_loaded = True


class LocalRetrieval(AbsTaskRetrieval):
    metadata = _metadata("LocalRetrieval", "Retrieval", "ndcg_at_10")

    def load_data(self, **kwargs):
        split = {
            "queries": Dataset.from_list([{"id": k, "text": v} for k, v in QUERIES.items()]),
            "corpus": Dataset.from_list([{"id": k, "text": v, "title": ""} for k, v in CORPUS.items()]),
            "relevant_docs": RELEVANT,
            "top_ranked": None,
        }
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


@pytest.fixture(scope="module")
def stsb_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stsb")
    lines = [f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s:.3f}\t{a}\t{b}" for i, (a, b, s) in enumerate(STS_PAIRS)]
    (folder / "sts-dev.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def _sts_task(folder):
    task = LocalSTSB()
    task.data_dir = folder
    return task


def test_encoder_protocol_and_meta(default_encoder):
    model = MTEBEncoder(default_encoder)
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.name == "llm2vec-fast/SmolLM2-135M-Instruct"  # a local folder: its name
    assert meta.embed_dim == 576 and meta.use_instructions and meta.framework == ["LLM2Vec", "PyTorch"]
    assert MTEBEncoder(default_encoder, model_name="my-encoder", truncate_dim=128).mteb_model_meta.name == "llm2vec-fast/my-encoder"
    a, b = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    sims = model.similarity(a, b)
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(np.asarray(sims), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.similarity_pairwise(a, b)), np.diag(expected), rtol=1e-5, atol=1e-6)


def test_stsb_spearman_equals_eval_sts(default_encoder, stsb_folder):
    """The same data through mteb and through ``llm2vec-fast eval sts`` give the same Spearman."""
    ours = stsb_spearman(default_encoder, "dev", data_dir=stsb_folder)
    plain = run_mteb(MTEBEncoder(default_encoder, instructions={"LocalSTSB": ""}), [_sts_task(stsb_folder)], show_progress_bar=False)
    assert abs(100 * plain["LocalSTSB"]["test"]["cosine_spearman"] - ours) < 0.01
    # default: the STS instruction on both sides
    model = MTEBEncoder(default_encoder)
    instruction = model.instruction_for(LocalSTSB.metadata)
    assert instruction == "Retrieve semantically similar text:"
    with_instruction = run_mteb(model, [_sts_task(stsb_folder)], show_progress_bar=False)
    ours_instructed = stsb_spearman(default_encoder, "dev", data_dir=stsb_folder, instruction=instruction)
    assert abs(100 * with_instruction["LocalSTSB"]["test"]["main_score"] - ours_instructed) < 0.01
    assert abs(ours_instructed - ours) > 0.01  # the instruction changes the embeddings
    # the CLI prints the same number
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "eval",
            "sts",
            "--model",
            "default-base",
            "--data-dir",
            stsb_folder,
            "--device",
            "cpu",
            "--instruction",
            instruction,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    printed = float(re.search(r"Spearman x100: ([-\d.]+)", r.stdout).group(1))
    assert abs(printed - 100 * with_instruction["LocalSTSB"]["test"]["main_score"]) < 0.01


def test_truncated_dimensions(default_encoder, stsb_folder):
    model = MTEBEncoder(default_encoder, instructions={"LocalSTSB": ""}, truncate_dim=64)
    assert model.mteb_model_meta.embed_dim == 64
    score = run_mteb(model, [_sts_task(stsb_folder)], show_progress_bar=False)["LocalSTSB"]["test"]["main_score"]
    assert abs(100 * score - stsb_spearman(default_encoder, "dev", data_dir=stsb_folder, truncate_dim=64)) < 0.01


class _Recorder:
    """Wraps an encoder and records what ``encode`` received."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, inputs, **kwargs):
        self.calls.append(list(inputs))
        return self.encoder.encode(inputs, **kwargs)


def test_retrieval_instructions_go_to_queries_only(default_encoder, tmp_path):
    recorder = _Recorder(default_encoder)
    model = MTEBEncoder(recorder, instructions={"LocalRetrieval": RETRIEVAL_INSTRUCTION})
    scores = run_mteb(model, [LocalRetrieval()], output_folder=tmp_path / "results", show_progress_bar=False)["LocalRetrieval"]["test"]
    docs = [c for c in recorder.calls if all(isinstance(x, str) for x in c)]
    queries = [c for c in recorder.calls if all(isinstance(x, list) for x in c)]
    assert sorted(x for c in docs for x in c) == sorted(CORPUS.values())  # documents: no instruction
    assert sorted(t for c in queries for _, t in c) == sorted(QUERIES.values())
    assert {i for c in queries for i, _ in c} == {RETRIEVAL_INSTRUCTION}
    # recall@1 recomputed by hand from the same embeddings
    q = default_encoder.encode([[RETRIEVAL_INSTRUCTION, t] for t in QUERIES.values()], normalize_embeddings=True)
    d = default_encoder.encode(list(CORPUS.values()), normalize_embeddings=True)
    doc_ids = list(CORPUS)
    top = [doc_ids[i] for i in (q @ d.T).argmax(dim=1).tolist()]
    hits = [top[i] in RELEVANT[qid] for i, qid in enumerate(QUERIES)]
    assert scores["precision_at_1"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert 0 <= scores["ndcg_at_10"] <= 1
    assert list((tmp_path / "results").rglob("LocalRetrieval.json"))


def test_default_instruction_table_and_overrides(default_encoder):
    model = MTEBEncoder(default_encoder)
    scifact, sts12 = mteb.get_task("SciFact").metadata, mteb.get_task("STS12").metadata
    assert model.instruction_for(scifact, PromptType.query) == LLM2VEC_TASK_INSTRUCTIONS["SciFact"]
    assert model.instruction_for(scifact, PromptType.document) == ""
    assert model.instruction_for(sts12, None) == "Retrieve semantically similar text:"
    assert model.instruction_for(mteb.get_task("Banking77Classification").metadata) == LLM2VEC_TASK_INSTRUCTIONS["Banking77Classification"]
    custom = MTEBEncoder(default_encoder, instructions={"SciFact": "Find evidence:", "STS12": "", "SciFact-document": "Evidence:"})
    assert custom.instruction_for(scifact, PromptType.query) == "Find evidence:"
    assert custom.instruction_for(scifact, PromptType.document) == "Evidence:"
    assert custom.instruction_for(sts12) == ""
    bare = MTEBEncoder(default_encoder, use_default_instructions=False)
    assert bare.instruction_for(scifact, PromptType.query) == ""
    # a task outside the table: mteb's own prompt, in the LLM2Vec format
    assert model.instruction_for(LocalRetrieval.metadata, PromptType.query) == "Retrieve text based on user query:"
    # MTEB(eng, v2)'s variants of a table task (adapted_from) take that task's instruction
    for name in ("ClimateFEVERHardNegatives", "FEVERHardNegatives", "HotpotQAHardNegatives", "Touche2020Retrieval.v3"):
        variant = mteb.get_task(name).metadata
        source = next(s for s in variant.adapted_from if s in LLM2VEC_TASK_INSTRUCTIONS)
        assert model.instruction_for(variant, PromptType.query) == LLM2VEC_TASK_INSTRUCTIONS[source], name
        assert model.instruction_for(variant, PromptType.document) == ""
    with pytest.raises(TypeError):
        MTEBEncoder(default_encoder, instructions={"SciFact": 3})
    with pytest.raises(ValueError, match="exceeds"):
        MTEBEncoder(default_encoder, truncate_dim=1000)


def test_onnx_encoder_is_wrapped_too(tiny_llama_dir, stsb_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from llm2vec_fast.export import OnnxEncoder, ValidationConfig, export_onnx

    torch_encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")
    folder = export_onnx(torch_encoder, tmp_path / "onnx", precision="fp32", validate=ValidationConfig(stsb_pairs=0))
    scores = [
        run_mteb(MTEBEncoder(enc), [_sts_task(stsb_folder)], show_progress_bar=False)["LocalSTSB"]["test"]["main_score"]
        for enc in (torch_encoder, OnnxEncoder.from_pretrained(folder))
    ]
    assert scores[0] == pytest.approx(scores[1], abs=1e-3)
    assert "ONNX" in MTEBEncoder(OnnxEncoder.from_pretrained(folder)).mteb_model_meta.framework


def test_missing_task_data_fails_at_once_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    task = mteb.get_task("STSBenchmark")
    with pytest.raises(TaskDataMissingError, match="STSBenchmark.*not available locally.*never downloads"):
        load_task_data(task)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    import os

    r = subprocess.run(
        [sys.executable, "-c", CLI, "eval", "mteb", "--tasks", "STSBenchmark", "--model", "/nonexistent-model"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert r.returncode == 2 and "STSBenchmark" in r.stderr and "not available locally" in r.stderr  # before the model loads
    r = subprocess.run([sys.executable, "-c", CLI, "eval", "mteb", "--tasks", "NoSuchTask"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown MTEB task 'NoSuchTask'" in r.stderr
