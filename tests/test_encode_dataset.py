"""``encode_dataset`` in one process with a tiny random model: every input format, globs, id and
instruction fields, bad rows under both policies, malformed files, resume after a failure on the
k-th chunk, refused reruns, overwrite, float16 output, the CLI."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm2vec_fast import LLM2Vec, encode_dataset
from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.dataset import BadRowError, MalformedInputError, SettingsMismatchError, chunk_worker, read_embeddings

WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars glow above quiet hills".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 25)))) + f" #{i}" for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")


def encode_ref(encoder, inputs) -> np.ndarray:
    return encoder.encode(inputs, batch_size=8, convert_to_numpy=True)


def assert_same_embeddings(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, cos.min()


def run(tmp_path, inputs, tiny, name="out", **kw):
    kw.setdefault("chunk_rows", 16)
    kw.setdefault("batch_size", 8)
    kw.setdefault("show_progress_bar", False)
    return encode_dataset(inputs, tmp_path / name, encoder=tiny, **kw)


# ------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "tsv", "text"])
def test_every_format_equals_encode(tmp_path, tiny, fmt):
    texts = make_texts(53)
    texts[3] = 'with "quotes", commas, and a tab-free \\ backslash'
    if fmt == "csv":
        texts[5] = "a text\nover two lines"  # quoted newline inside a CSV value
    path = tmp_path / f"data.{'txt' if fmt == 'text' else fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [{"text": t, "other": i} for i, t in enumerate(texts)])
    elif fmt == "parquet":
        pq.write_table(pa.table({"other": list(range(len(texts))), "text": texts}), path, row_group_size=10)
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["other", "text"])
            w.writerows([[i, t] for i, t in enumerate(texts)])
    elif fmt == "tsv":
        path.write_text("other\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    else:
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    manifest = run(tmp_path, path, tiny)
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == list(range(len(texts)))
    assert_same_embeddings(emb, encode_ref(tiny, texts))
    assert manifest["complete"] and manifest["encoded_rows"] == len(texts) and manifest["skipped"] == []
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 16, 5]
    assert manifest["dimension"] == tiny.hidden_size and manifest["tokens"] == sum(len(x.input_ids) for x in tiny.tokenize(texts))
    assert manifest["settings"]["inputs"][0]["rows"] == len(texts)
    table = pq.read_table(tmp_path / "out" / "part-000000.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), tiny.hidden_size)
    assert table.schema.field("id").type == pa.int64()


def test_glob_over_mixed_files_numbers_rows_globally(tmp_path, tiny):
    texts = make_texts(70, seed=1)
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": t} for t in texts[30:50]])
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts[:30]])
    pq.write_table(pa.table({"text": texts[50:]}), tmp_path / "in" / "c.parquet", row_group_size=7)
    manifest = run(tmp_path, str(tmp_path / "in" / "*"), tiny, chunk_rows=13)
    assert [os.path.basename(f["path"]) for f in manifest["settings"]["inputs"]] == ["a.jsonl", "b.jsonl", "c.parquet"]
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == list(range(70))
    assert_same_embeddings(emb, encode_ref(tiny, texts))
    # a folder reads the same files; a glob matching nothing is an error
    run(tmp_path, tmp_path / "in", tiny, name="out2", chunk_rows=13)
    assert read_embeddings(tmp_path / "out2")[0] == ids
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run(tmp_path, str(tmp_path / "in" / "*.csv"), tiny, name="out3")


def test_id_field_and_instruction_field(tmp_path, tiny):
    texts = make_texts(40, seed=2)
    instructions = ["Retrieve passages about: " if i % 3 else None for i in range(40)]
    rows = [{"doc": t, "key": f"doc-{i}", "task": s} for i, (t, s) in enumerate(zip(texts, instructions))]
    rows[7].pop("task")  # a missing instruction means none
    instructions[7] = None
    write_jsonl(tmp_path / "d.jsonl", rows)
    run(tmp_path, tmp_path / "d.jsonl", tiny, text_field="doc", id_field="key", instruction_field="task")
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == [f"doc-{i}" for i in range(40)]
    want = encode_ref(tiny, [[s, t] if s else t for t, s in zip(texts, instructions)])
    assert_same_embeddings(emb, want)
    assert pq.read_table(tmp_path / "out" / "part-000000.parquet").schema.field("id").type == pa.string()


def test_integer_ids_and_one_instruction(tmp_path, tiny):
    texts = make_texts(20, seed=3)
    pq.write_table(pa.table({"id": [1000 + 3 * i for i in range(20)], "text": texts}), tmp_path / "d.parquet")
    run(tmp_path, tmp_path / "d.parquet", tiny, id_field="id", instruction="Represent the sentence: ", chunk_rows=7)
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == [1000 + 3 * i for i in range(20)]
    assert_same_embeddings(emb, encode_ref(tiny, [["Represent the sentence: ", t] for t in texts]))


def test_float16_output_and_progress_bar(tmp_path, tiny, capsys):
    texts = make_texts(20, seed=4)
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    manifest = run(tmp_path, tmp_path / "d.jsonl", tiny, dtype_out="float16", show_progress_bar=True)
    bar = capsys.readouterr().err
    assert "Encoding dataset" in bar and "20/20" in bar and "row/s" in bar and "tokens/s" in bar
    table = pq.read_table(tmp_path / "out" / "part-000000.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), tiny.hidden_size)
    _, emb = read_embeddings(tmp_path / "out")
    assert emb.dtype == np.float16 and manifest["dtype_out"] == "float16"
    np.testing.assert_allclose(emb.astype(np.float32), encode_ref(tiny, texts), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------- grouping and padding
def test_group_size_fills_the_sort_window_but_leaves_work_for_every_worker():
    window = chunk_worker.SORT_WINDOW_ROWS
    assert chunk_worker.group_size(window, 100, 1) == 1  # default chunks: one chunk per group
    assert chunk_worker.group_size(window * 2, 100, 1) == 1
    assert chunk_worker.group_size(window // 4, 100, 1) == 4  # small chunks: up to a window
    assert chunk_worker.group_size(10, 8, 1) == 8  # not more than remain
    assert [chunk_worker.group_size(10, r, 2) for r in (8, 4, 2, 1)] == [4, 2, 1, 1]  # even shares, shrinking
    assert chunk_worker.group_size(10, 1, 3) == 1


def test_small_chunks_push_no_more_tokens_through_the_model_than_encode(tmp_path, tiny):
    """Chunks are embedded together under one length sort: 9-row chunks cost no extra padding."""
    texts = make_texts(120, seed=11)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    manifest = run(tmp_path, path, tiny, chunk_rows=9, batch_size=8)
    items = tiny.tokenize(texts)
    assert manifest["tokens"] == sum(len(x.input_ids) for x in items)
    assert manifest["forward_tokens"] == int(tiny.forward_lengths(items, 8).sum())  # as encode() batches them
    per_chunk = sum(int(tiny.forward_lengths(items[i : i + 9], 8).sum()) for i in range(0, 120, 9))
    assert manifest["tokens"] < manifest["forward_tokens"] < per_chunk  # padding counted; less than 9-row sorts
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == list(range(120)) and len(manifest["shards"]) == 14
    assert_same_embeddings(emb, tiny.encode(texts, batch_size=8, convert_to_numpy=True))


def test_forward_lengths_padded_and_packed(tiny_llama_dir):
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", packed=False)
    items = encoder.tokenize(["a", "a b c d e f", "a b", "a b c d e f g h i j"])
    lengths = [len(x.input_ids) for x in items]
    got = encoder.forward_lengths(items, batch_size=2)  # batches: the two longest, the two shortest
    assert got.tolist() == [lengths[2], lengths[3], lengths[2], lengths[3]]
    encoder.packed = True  # padding-free batches: each input costs its own length
    assert encoder.forward_lengths(items, batch_size=2).tolist() == lengths


def test_a_failed_background_shard_write_fails_the_job(tmp_path, tiny, monkeypatch):
    from llm2vec_fast.dataset import writer

    real_write = writer.write_shard

    def failing_write(out_dir, chunk, *args):
        if chunk == 2:
            raise OSError("disk full (simulated)")
        return real_write(out_dir, chunk, *args)

    monkeypatch.setattr(writer, "write_shard", failing_write)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_texts(50, seed=12)])
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, path, tiny, chunk_rows=10)
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert "part-000002.parquet" not in {p.name for p in out.glob("part-*")}
    monkeypatch.setattr(writer, "write_shard", real_write)
    manifest = run(tmp_path, path, tiny, chunk_rows=10)  # resume completes it
    assert manifest["complete"] and read_embeddings(out)[0] == list(range(50))


# ------------------------------------------------------------------------------------ bad rows
def bad_rows_file(tmp_path):
    texts = make_texts(30, seed=5)
    rows = [{"text": t} for t in texts]
    rows[4] = {"other": 1}  # missing
    rows[9] = {"text": None}  # null
    rows[17] = {"text": "   "}  # empty
    rows[22] = {"text": 42}  # not a string
    return write_jsonl(tmp_path / "bad.jsonl", rows), texts


def test_bad_rows_error_names_file_and_row_before_any_work(tmp_path, tiny):
    path, _ = bad_rows_file(tmp_path)
    with pytest.raises(BadRowError, match=r"bad\.jsonl: row 4 .*line 5.*'text' is missing"):
        run(tmp_path, path, tiny)
    assert not (tmp_path / "out").exists()


def test_bad_rows_skip_lists_them(tmp_path, tiny):
    path, texts = bad_rows_file(tmp_path)
    manifest = run(tmp_path, path, tiny, on_bad_row="skip", chunk_rows=10)
    bad = [4, 9, 17, 22]
    assert [s["row"] for s in manifest["skipped"]] == bad
    assert [s["reason"] for s in manifest["skipped"]] == [
        "text field 'text' is missing",
        "text field 'text' is null",
        "text field 'text' is empty",
        "text field 'text' is a int, not a string",
    ]
    assert all(s["file"] == str(path) for s in manifest["skipped"])
    ids, emb = read_embeddings(tmp_path / "out")
    keep = [i for i in range(30) if i not in bad]
    assert ids == keep and manifest["encoded_rows"] == 26 and manifest["skipped_rows"] == 4
    assert_same_embeddings(emb, encode_ref(tiny, [texts[i] for i in keep]))


def test_bad_rows_in_columnar_and_text_files(tmp_path, tiny):
    pq.write_table(pa.table({"text": ["ok one", None, "ok two", ""]}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_text("fine\n\nalso fine\n", encoding="utf-8")
    with pytest.raises(BadRowError, match=r"a\.parquet: row 1: text field 'text' is null"):
        run(tmp_path, tmp_path / "a.parquet", tiny)
    with pytest.raises(BadRowError, match=r"b\.txt: row 1 .*line 2.*empty"):
        run(tmp_path, tmp_path / "b.txt", tiny)
    manifest = run(tmp_path, [tmp_path / "a.parquet", tmp_path / "b.txt"], tiny, on_bad_row="skip")
    assert [(os.path.basename(s["file"]), s["file_row"], s["row"]) for s in manifest["skipped"]] == [
        ("a.parquet", 1, 1),
        ("a.parquet", 3, 3),
        ("b.txt", 1, 5),
    ]
    assert read_embeddings(tmp_path / "out")[0] == [0, 2, 4, 6]


def test_malformed_files_fail_before_any_work_under_both_policies(tmp_path, tiny):
    good = write_jsonl(tmp_path / "a_good.jsonl", [{"text": t} for t in make_texts(10)])
    bad_json = tmp_path / "b_bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": "broken"\n', encoding="utf-8")
    for policy in ("error", "skip"):
        with pytest.raises(MalformedInputError, match=r"b_bad\.jsonl: line 2 is not valid JSON"):
            run(tmp_path, [good, bad_json], tiny, on_bad_row=policy)
    assert not (tmp_path / "out").exists()
    not_parquet = tmp_path / "c.parquet"
    not_parquet.write_bytes(b"definitely not parquet")
    with pytest.raises(MalformedInputError, match=r"c\.parquet: not a readable Parquet file"):
        run(tmp_path, [good, not_parquet], tiny)
    no_column = tmp_path / "d.csv"
    no_column.write_text("title,body\nx,y\n", encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"d\.csv: no column 'text' \(columns: title, body\)"):
        run(tmp_path, [good, no_column], tiny)
    ragged = tmp_path / "e.csv"
    ragged.write_text("text,id\nfine,1\nmissing a column\n", encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"e\.csv"):
        run(tmp_path, [good, ragged], tiny)
    not_object = tmp_path / "f.jsonl"
    not_object.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(MalformedInputError, match=r"f\.jsonl: line 1 is a JSON list, not an object"):
        run(tmp_path, not_object, tiny)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ resume / refuse
class Boom(RuntimeError):
    pass


def test_failure_on_kth_chunk_then_resume(tmp_path, tiny, monkeypatch):
    texts = make_texts(100, seed=6)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    monkeypatch.setattr(chunk_worker, "SORT_WINDOW_ROWS", 30)  # groups of 3 chunks of 10 rows
    real_run = chunk_worker.ChunkWorker.run_chunks
    calls = []

    def failing_run(self, chunks, on_progress=None):
        calls.append(list(chunks))
        if len(calls) == 2:
            raise Boom("simulated crash in the 2nd group (chunks 3-5)")
        return real_run(self, chunks, on_progress)

    monkeypatch.setattr(chunk_worker.ChunkWorker, "run_chunks", failing_run)
    with pytest.raises(Boom):
        run(tmp_path, path, tiny, chunk_rows=10)
    assert calls == [[0, 1, 2], [3, 4, 5]]
    out = tmp_path / "out"
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert done == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]  # the 1st group's, written in the background
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    # a shard that was being written when the process died, and a truncated "complete" one
    (out / ".part-000003.parquet.tmp-99999").write_bytes(b"partial")
    (out / "part-000004.parquet").write_bytes(b"PAR1 truncated")
    mtimes = {p: (out / p).stat().st_mtime_ns for p in done}

    resumed = []
    monkeypatch.setattr(chunk_worker.ChunkWorker, "run_chunks", lambda self, c, p=None: resumed.append(list(c)) or real_run(self, c, p))
    manifest = run(tmp_path, path, tiny, chunk_rows=10)
    assert resumed == [[3, 4, 5], [6, 7, 8], [9]]  # complete shards kept, the rest redone
    assert {p: (out / p).stat().st_mtime_ns for p in done} == mtimes
    assert not list(out.glob(".part-*"))
    ids, emb = read_embeddings(out)
    assert ids == list(range(100))
    assert_same_embeddings(emb, encode_ref(tiny, texts))
    assert manifest["complete"] and manifest["runs"] == 2 and manifest["encoded_rows"] == 100
    # a finished job rerun is a no-op
    resumed.clear()
    run(tmp_path, path, tiny, chunk_rows=10)
    assert resumed == []


def test_rerun_with_other_settings_is_refused_naming_the_difference(tmp_path, tiny, tiny_llama_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "i": str(i)} for i, t in enumerate(make_texts(20))])
    run(tmp_path, path, tiny)
    with pytest.raises(SettingsMismatchError, match=r"chunk_rows: 16 != 8"):
        run(tmp_path, path, tiny, chunk_rows=8)
    with pytest.raises(SettingsMismatchError, match=r"dtype_out: \"float32\" != \"float16\""):
        run(tmp_path, path, tiny, dtype_out="float16")
    with pytest.raises(SettingsMismatchError, match=r"id_field: null != \"i\""):
        run(tmp_path, path, tiny, id_field="i")
    other_pooling = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", pooling_mode="eos_token")
    with pytest.raises(SettingsMismatchError, match=r"model\.pooling_mode: \"mean\" != \"eos_token\""):
        run(tmp_path, path, other_pooling)
    with pytest.raises(SettingsMismatchError, match=r"model\.weights: "):
        import torch

        changed = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")
        with torch.no_grad():
            next(changed.model.parameters()).mul_(1.01)
        run(tmp_path, path, changed)
    write_jsonl(path, [{"text": t} for t in make_texts(21)])  # the input changed: named, with what changed in it
    with pytest.raises(SettingsMismatchError, match=r"inputs\[0\] \(.*d\.jsonl\)\.rows: 20 != 21"):
        run(tmp_path, path, tiny)
    manifest = run(tmp_path, path, tiny, chunk_rows=8, overwrite=True)
    assert manifest["runs"] == 1 and manifest["settings"]["chunk_rows"] == 8
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [f"part-00000{i}.parquet" for i in range(3)]


def test_csv_ids_stay_as_written(tmp_path, tiny):
    """CSV ids are read as text: "007" and "7" stay two ids (pyarrow's inferred int64 merged them), and
    a non-integer id after the first MiB does not fail the job; all-integer ids are still int64."""
    texts = make_texts(4, seed=5)
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], ["007", texts[0]], ["7", texts[1]], ["0042", texts[2]], ["-3", texts[3]]])
    run(tmp_path, tmp_path / "a.csv", tiny, id_field="id")
    assert read_embeddings(tmp_path / "out")[0] == ["007", "7", "0042", "-3"]
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], ["1", texts[0]], ["", texts[1]], ["0", texts[2]], ["-0", texts[3]]])
    with pytest.raises(BadRowError, match="id field 'id' is null"):  # an empty cell is a missing id
        run(tmp_path, tmp_path / "c.csv", tiny, name="c", id_field="id")
    run(tmp_path, tmp_path / "c.csv", tiny, name="c", id_field="id", on_bad_row="skip")
    assert read_embeddings(tmp_path / "c")[0] == ["1", "0", "-0"]  # "-0" is not 0
    with open(tmp_path / "b.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], ["7", texts[0]], ["-3", texts[1]]])
    run(tmp_path, tmp_path / "b.csv", tiny, name="ints", id_field="id")
    assert read_embeddings(tmp_path / "ints")[0] == [7, -3]
    assert pq.read_table(tmp_path / "ints" / "part-000000.parquet").schema.field("id").type == pa.int64()
    rows = [["id", "text"]] + [[str(i), "filler text " * 8] for i in range(12_000)] + [["doc-abc", texts[0]]]
    with open(tmp_path / "big.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    assert (tmp_path / "big.csv").stat().st_size > 1_100_000  # past pyarrow's first block
    from llm2vec_fast.dataset.plan import make_plan
    from llm2vec_fast.dataset.readers import Fields

    assert make_plan([tmp_path / "big.csv"], Fields("text", "id"), 4096, "error").id_type == "string"


def test_ids_past_int64_are_strings(tmp_path, tiny):
    texts = make_texts(3, seed=6)
    write_jsonl(tmp_path / "d.jsonl", [{"text": t, "id": i} for t, i in zip(texts, [1, 2**64 - 1, -(2**63)])])
    run(tmp_path, tmp_path / "d.jsonl", tiny, id_field="id")
    assert read_embeddings(tmp_path / "out")[0] == ["1", str(2**64 - 1), str(-(2**63))]
    pq.write_table(pa.table({"id": pa.array([5, 2**63 + 5], pa.uint64()), "text": texts[:2]}), tmp_path / "u.parquet")
    run(tmp_path, tmp_path / "u.parquet", tiny, name="u", id_field="id")
    assert read_embeddings(tmp_path / "u")[0] == ["5", str(2**63 + 5)]


def test_lone_surrogates_are_bad_rows_before_any_work(tmp_path, tiny):
    """JSON's "\\ud83d" (half an emoji) decodes to a lone surrogate, which the tokenizer and Parquet
    refuse: a bad row (named before encoding, or skipped), not a crash mid-job."""
    texts = make_texts(4, seed=7)
    lines = [json.dumps({"text": t, "id": f"k{i}"}) for i, t in enumerate(texts)]
    lines[1] = '{"text": "cut emoji \\ud83d here", "id": "k1"}'
    lines[2] = '{"text": "fine text", "id": "bad \\udc00 id"}'
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BadRowError, match=r"s\.jsonl: row 1 .*not valid Unicode"):
        run(tmp_path, tmp_path / "s.jsonl", tiny, id_field="id")
    manifest = run(tmp_path, tmp_path / "s.jsonl", tiny, id_field="id", on_bad_row="skip")
    assert [s["row"] for s in manifest["skipped"]] == [1, 2]
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == ["k0", "k3"]
    assert_same_embeddings(emb, encode_ref(tiny, [texts[0], texts[3]]))


def test_a_chunk_of_bad_rows_leaves_an_empty_shard_that_reads_back(tmp_path, tiny):
    texts = make_texts(6, seed=8)
    rows = [{"text": t} for t in texts[:3]] + [{"text": ""}] * 3
    write_jsonl(tmp_path / "d.jsonl", rows)
    run(tmp_path, tmp_path / "d.jsonl", tiny, chunk_rows=3, on_bad_row="skip")
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == [0, 1, 2] and emb.shape == (3, tiny.hidden_size)


def test_byte_order_mark_and_spark_style_folders(tmp_path, tiny):
    """A UTF-8 BOM (Windows editors) is not part of the first row; a folder of extensionless
    part files (Spark, Hadoop) is read with an explicit input format, its _SUCCESS and .crc skipped."""
    texts = make_texts(3, seed=9)
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(texts).encode() + b"\n")
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    for fmt in ("txt", "jsonl"):
        run(tmp_path, tmp_path / f"b.{fmt}", tiny, name=f"bom-{fmt}")
        assert_same_embeddings(read_embeddings(tmp_path / f"bom-{fmt}")[1], encode_ref(tiny, texts))
    blank_first = tmp_path / "blank-first.jsonl"  # a BOM, then a blank line: still a blank line
    blank_first.write_bytes(b"\xef\xbb\xbf\n" + "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    run(tmp_path, blank_first, tiny, name="bom-blank", chunk_rows=2)
    assert_same_embeddings(read_embeddings(tmp_path / "bom-blank")[1], encode_ref(tiny, texts))
    spark = tmp_path / "spark"
    spark.mkdir()
    (spark / "README.md").write_text("# a dataset card next to the data")
    write_jsonl(spark / "part-00000", [{"text": t} for t in texts[:2]])
    write_jsonl(spark / "part-00001", [{"text": texts[2]}])
    (spark / "_SUCCESS").write_text("")
    (spark / ".part-00000.crc").write_bytes(b"\x00\x01binary")
    (spark / "._part-00000.jsonl").write_bytes(b"\x00\x05macOS resource fork")  # hidden: never data
    run(tmp_path, spark, tiny, name="spark-out", input_format="jsonl")
    assert_same_embeddings(read_embeddings(tmp_path / "spark-out")[1], encode_ref(tiny, texts))
    from llm2vec_fast.dataset.readers import folder_files

    assert [p.name for p in folder_files(spark, "jsonl")] == ["part-00000", "part-00001"]
    dask = tmp_path / "dask"  # dask writes 0.part, 1.part; a dataset card sits next to Parquet files
    dask.mkdir()
    for name in ("0.part", "1.part", "LICENSE"):
        (dask / name).write_text("x\n")
    assert [p.name for p in folder_files(dask, "text")] == ["0.part", "1.part"]
    (dask / "data.parquet").write_bytes(b"")
    (dask / "README.md").write_text("card")
    assert [p.name for p in folder_files(dask, "parquet")] == ["data.parquet"]
    assert [p.name for p in folder_files(dask, None)] == ["data.parquet"]
    with pytest.raises(FileNotFoundError, match="holds no file of a known format"):
        run(tmp_path, spark, tiny, name="spark-no-format")


def test_argument_errors(tmp_path, tiny):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    for kw, msg in [
        (dict(engine="spark"), "engine must be"),
        (dict(dtype_out="int8"), "dtype_out"),
        (dict(on_bad_row="ignore"), "on_bad_row"),
        (dict(chunk_rows=0), "chunk_rows"),
        (dict(instruction="a", instruction_field="b"), "not both"),
        (dict(engine="ray"), "model/model_kwargs"),
    ]:
        with pytest.raises(ValueError, match=msg):
            run(tmp_path, path, tiny, **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tmp_path, tmp_path / "missing.jsonl", tiny)
    with pytest.raises(ValueError, match="plain text file has no fields"):
        (tmp_path / "t.txt").write_text("a\n")
        run(tmp_path, tmp_path / "t.txt", tiny, id_field="id")


# ----------------------------------------------------------------------------------------- CLI
def test_cli_encode_dataset(tmp_path, tiny_llama_dir, capsys):
    texts = make_texts(25, seed=7)
    (tmp_path / "in.tsv").write_text("id\ttext\n" + "".join(f"r{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    args = [
        "encode-dataset",
        "--input",
        str(tmp_path / "*.tsv"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        tiny_llama_dir,
        "--id-field",
        "id",
        "--chunk-rows",
        "10",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert cli_main(args) == 0
    assert "encoded 25 rows (0 skipped" in capsys.readouterr().err
    ids, emb = read_embeddings(tmp_path / "out")
    assert ids == [f"r{i}" for i in range(25)]
    assert_same_embeddings(emb, encode_ref(LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu"), texts))
    assert cli_main(args[:-1] + ["--chunk-rows", "5", "--no-progress"]) == 2
    assert "chunk_rows: 10 != 5" in capsys.readouterr().err


def test_chunks_read_in_any_order_give_the_same_rows(tmp_path):
    """A rank takes chunks out of order (dynamic hand-out, resume): seeks and forward scans agree."""
    from llm2vec_fast.dataset.chunk_worker import ChunkWorker, JobOptions
    from llm2vec_fast.dataset.plan import make_plan
    from llm2vec_fast.dataset.readers import Fields

    texts = make_texts(120, seed=8)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:25]] + [{}] + [{"text": t} for t in texts[25:40]])
    pq.write_table(pa.table({"text": texts[40:70]}), tmp_path / "b.parquet", row_group_size=4)
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text"]] + [[t] for t in texts[70:95]])
    (tmp_path / "d.txt").write_text("\n".join(texts[95:]) + "\n", encoding="utf-8")
    paths = [tmp_path / n for n in ("a.jsonl", "b.parquet", "c.csv", "d.txt")]
    plan = make_plan(paths, Fields(), chunk_rows=9, on_bad_row="skip")
    assert plan.total_rows == 121 and [s["row"] for s in plan.skipped] == [25]
    order = [5, 1, 12, 3, 0, 13, 7, 2, 9, 4, 11, 6, 10, 8]
    worker = ChunkWorker.__new__(ChunkWorker)  # reading only: no encoder
    worker.plan, worker.options, worker._cursors = plan, JobOptions(Fields()), {}
    got = {c: worker.read_chunk(c) for c in order}
    assert sorted(got) == list(range(plan.num_chunks))
    ids = [i for c in range(plan.num_chunks) for i in got[c][0]]
    rows = [t for c in range(plan.num_chunks) for t in got[c][1]]
    assert ids == [i for i in range(121) if i != 25] and rows == texts
