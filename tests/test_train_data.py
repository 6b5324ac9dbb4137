"""Training data, batch schedule, configs and the STS-B reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm2vec_fast.stsb import load_stsb, rankdata, spearman, stsb_sentences
from llm2vec_fast.train import ConfigError, load_config, make_config
from llm2vec_fast.train.data import BatchSchedule, rank_slice, read_text_lines, read_triplets


def test_schedule_is_deterministic_and_covers_an_epoch():
    s = BatchSchedule(103, 10, seed=1)
    assert s.batches_per_epoch == 10
    epoch = [s.batch(i) for i in range(10)]
    flat = [i for b in epoch for i in b]
    assert len(set(flat)) == 100 and all(len(b) == 10 for b in epoch)
    assert BatchSchedule(103, 10, seed=1).batch(7) == epoch[7]  # position = step, nothing else
    assert s.batch(10) != epoch[0]  # next epoch reshuffles
    assert BatchSchedule(103, 10, seed=2).batch(0) != epoch[0]


def test_one_dataset_per_batch():
    groups = ["a"] * 35 + ["b"] * 21 + ["c"] * 5
    s = BatchSchedule(len(groups), 8, seed=0, groups=groups)
    assert s.batches_per_epoch == 4 + 2  # remainders dropped, c has no full batch
    seen = set()
    for step in range(12):
        batch = s.batch(step)
        assert len(batch) == 8 and len({groups[i] for i in batch}) == 1
        seen.add(groups[batch[0]])
    assert seen == {"a", "b"}
    with pytest.raises(ConfigError, match="full batch"):
        BatchSchedule(5, 8, seed=0, groups=["a"] * 5)


def test_rank_slice():
    assert rank_slice(list(range(8)), 1, 2) == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="divisible"):
        rank_slice(list(range(7)), 0, 2)


def test_readers(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("one\n\n  two  \n")
    assert read_text_lines([str(text)]) == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="no non-empty line"):
        read_text_lines([str(tmp_path / "empty.txt")])
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"query": ["Find the answer", "q1"], "positive": "p", "negative": "n", "dataset": "x"})
        + "\n"
        + json.dumps({"query": "q2", "instruction": "Given", "positive": "p", "negative": "n"})
        + "\n"
    )
    rows = read_triplets([str(data)])
    assert (rows[0].instruction, rows[0].query, rows[0].dataset) == ("Find the answer", "q1", "x")
    assert (rows[1].instruction, rows[1].dataset) == ("Given", "default")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q"}\n')
    with pytest.raises(ConfigError, match="missing field"):
        read_triplets([str(bad)])


def test_config_defaults_follow_the_official_recipes(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("a\n")
    m = make_config("mntp", {"data": str(f)})
    assert (m.lr, m.max_steps, m.max_length, m.mlm_probability) == (5e-5, 1000, 512, 0.2)
    s = make_config("simcse", {"data": str(f)})
    assert (s.lr, s.batch_size, s.max_length, s.max_steps, s.attention_dropout, s.loss_scale) == (3e-5, 128, 128, 1000, 0.3, 20.0)
    j = tmp_path / "x.jsonl"
    j.write_text("{}\n")
    v = make_config("supervised", {"data": str(j)})
    assert (v.lr, v.warmup_steps, v.batch_size, v.max_length) == (2e-4, 300, 64, 512)
    assert (m.lora_r, m.lora_alpha, m.lora_dropout) == (16, 32, 0.05)
    # Phi-3's stacked projections too (peft skips the names a model does not have)
    assert m.lora_target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "gate_up_proj",
        "down_proj",
    ]
    assert (m.output_dir, s.output_dir, v.output_dir) == ("runs/mntp", "runs/simcse", "runs/supervised")  # a chain keeps each adapter


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("a\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {f}\nlr: 1.0e-3\nmax_steps: 5\n")
    c = load_config("simcse", cfg, ["max_steps=7", "peft=[]", "gradcache=true", "lr=2e-4"])
    assert (c.lr, c.max_steps, c.gradcache, c.peft) == (2e-4, 7, True, [])
    jcfg = tmp_path / "c.json"
    jcfg.write_text(json.dumps({"data": str(f), "batch_size": 4}))
    assert load_config("mntp", jcfg).batch_size == 4


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data": "x.txt", "learning_rate": 1}, "unknown simcse config key.*'learning_rate'.*did you mean 'lr'"),
        ({"data": "/nonexistent/data.txt"}, "does not exist"),
        ({}, "no training data"),
        ({"data": "x.txt", "lr": "fast"}, "lr must be a number"),
        ({"data": "x.txt", "max_steps": 0}, "max_steps must be positive"),
        ({"data": "x.txt", "pooling_mode": "max"}, "pooling_mode must be one of"),
        ({"data": "x.txt", "peft": ["/nonexistent/adapter"]}, "adapter_config.json"),
        ({"data": "x.txt", "batch_layout": "ragged"}, "batch_layout"),
        ({"data": "x.txt", "lr": None}, "lr cannot be null"),
        ({"data": "x.txt", "matryoshka_dims": None}, "matryoshka_dims cannot be null"),
        ({"data": "x.txt", "batch_size": 1}, "SimCSE needs a batch_size of at least 2"),
        ({"data": "x.txt", "seed": 2**64}, r"seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_bad_configs_fail_clearly(tmp_path, monkeypatch, values, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(ConfigError, match=message):
        make_config("simcse", values)


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("mntp", None, ["lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("mntp", tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"--set 'peft=\[runs/mntp/adapter': the value is not valid YAML"):
        load_config("mntp", None, ["peft=[runs/mntp/adapter"])
    (tmp_path / "broken.yaml").write_text("data: [sent.txt\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml' is not valid YAML"):
        load_config("mntp", tmp_path / "broken.yaml")
    (tmp_path / "broken.json").write_text('{"data": ')
    with pytest.raises(ConfigError, match=r"broken\.json' is not valid JSON"):
        load_config("mntp", tmp_path / "broken.json")
    (tmp_path / "x.txt").write_text("a\n")
    assert load_config("mntp", None, [f"data={tmp_path / 'x.txt'}", "peft="]).peft == []  # null: no adapters


def test_a_run_may_not_write_over_its_own_input_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("a\n")
    (tmp_path / "runs" / "simcse" / "adapter").mkdir(parents=True)
    (tmp_path / "runs" / "simcse" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="lies where this run writes"):
        make_config("simcse", {"data": "x.txt", "peft": ["runs/simcse/adapter"]})
    assert make_config("simcse", {"data": "x.txt", "peft": ["runs/simcse/adapter"], "output_dir": "runs/simcse2"}).peft
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "adapter"  # a fresh run clears checkpoints/
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="lies where this run writes"):
        make_config("simcse", {"data": "x.txt", "peft": [str(checkpoint)], "output_dir": "run"})
    # elsewhere under output_dir is fine: the run writes only adapter/ and checkpoints/ there
    assert make_config("simcse", {"data": "x.txt", "peft": ["runs/simcse/adapter"], "output_dir": "."}).peft


def test_readers_split_lines_at_newlines_only(tmp_path):
    """U+2028, form feeds and NEL are text (json.dumps(ensure_ascii=False) writes U+2028 as is), a
    BOM is not, and a file that is not UTF-8 is named."""
    text = tmp_path / "t.txt"
    text.write_text("\ufeffone\u2028still one\r\ntwo\x0cthree\x85four\n", encoding="utf-8")
    assert read_text_lines([str(text)]) == ["one\u2028still one", "two\x0cthree\x85four"]
    data = tmp_path / "d.jsonl"
    row = {"query": "q\u2028x", "positive": "p", "negative": "n"}
    data.write_text("\ufeff" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_triplets([str(data)])[0].query == "q\u2028x"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.txt' is not valid UTF-8"):
        read_text_lines([str(tmp_path / "latin1.txt")])


def test_a_runs_train_config_json_is_a_config(tmp_path):
    (tmp_path / "x.txt").write_text("a\n")
    config = make_config("simcse", {"data": str(tmp_path / "x.txt"), "max_steps": 5})
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps({"stage": "simcse", **config.to_dict()}))
    assert load_config("simcse", saved).to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match="for the 'simcse' stage, not 'mntp'"):
        load_config("mntp", saved)


def test_datasets_smaller_than_a_batch_are_named(caplog):
    from llm2vec_fast.train.data import BatchSchedule

    with caplog.at_level("WARNING", logger="llm2vec_fast"):
        BatchSchedule(6, 4, 0, groups=["big"] * 5 + ["tiny"])
    assert "never trained on" in caplog.text and "'tiny': 1" in caplog.text


def test_huge_seed_orders_batches():
    from llm2vec_fast.train.data import BatchSchedule

    assert len(BatchSchedule(10, 2, 2**63 - 1).epoch_batches(0)) == 5  # overflowed manual_seed


def test_stsb_reader_and_sentences():
    dev = load_stsb("dev")  # the checked-in sample (conftest points $LLM2VEC_FAST_STSB_DIR at it)
    assert len(dev) == 300
    assert dev[0] == ("A cat standing on tree branches.", "A black and white cat is high up on tree branches.", 3.6)
    assert all(0.0 <= s <= 5.0 for _, _, s in dev)
    train = stsb_sentences("train")
    assert len(train) == len(set(train)) > 500
    with pytest.raises(ValueError, match="unknown STS-B split"):
        load_stsb("validation")


def test_stsb_dir_is_configurable(tmp_path, monkeypatch):
    (tmp_path / "sts-dev.csv").write_text("g\tf\ty\t1\t2.5\tA \"quoted\t'b'\n")
    monkeypatch.setenv("LLM2VEC_FAST_STSB_DIR", str(tmp_path))
    assert load_stsb("dev") == [('A "quoted', "'b'", 2.5)]
    with pytest.raises(FileNotFoundError, match="LLM2VEC_FAST_STSB_DIR"):
        load_stsb("test")
    with pytest.raises(FileNotFoundError, match=r"from data_dir \(--data-dir\)"):
        load_stsb("dev", tmp_path / "elsewhere")
    for score in ("score", "nan", "7.5"):  # a header line, a NaN, a score out of range: named with the line
        (tmp_path / "sts-train.csv").write_text(f"g\tf\ty\t1\t2.5\ta\tb\ng\tf\ty\t1\t{score}\tc\td\n")
        with pytest.raises(ValueError, match=rf"sts-train\.csv:2: the score .* got '{score}'"):
            load_stsb("train")


def test_stsb_limit_is_checked_before_any_work(tmp_path):
    from llm2vec_fast.stsb import stsb_spearman

    for limit in (1, 0, -295):  # -295 scored the first 5 pairs (a slice), 1 scored 0.00
        with pytest.raises(ValueError, match="at least 2"):
            stsb_spearman(None, "dev", limit=limit)


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, 200).astype(float)
    b = a + rng.normal(0, 3, 200)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    np.testing.assert_array_equal(rankdata([3, 1, 3, 2]), scipy_stats.rankdata([3, 1, 3, 2]))
    # undefined where scipy's is: a constant input, a NaN (NaN embeddings must not get a score)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1, np.nan, 3], [1, 2, 3]))
