"""ONNX export (fp32/fp16/int8/int4), the OnnxEncoder and the export CLI.

Fast tests use a tiny random Llama (hidden 64, 2 layers) with the SmolLM2 tokenizer; the
default-model exports are ``slow`` (``--runslow``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MIXED_TEXTS

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from llm2vec_fast.export import (  # noqa: E402
    ExportValidationError,
    NotExportableError,
    OnnxEncoder,
    ValidationConfig,
    export_onnx,
)
from llm2vec_fast.export import exporter as exporter_module  # noqa: E402
from llm2vec_fast.export.calibrate import cosine_rows  # noqa: E402
from llm2vec_fast.export.precisions import PRECISIONS as ALL_PRECISIONS  # noqa: E402
from llm2vec_fast.export.precisions import precision_runtime  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402

# the ONNX Runtime precisions; int8-openvino (made for OpenVINO) is tested in test_openvino.py
PRECISIONS = tuple(p for p in ALL_PRECISIONS if precision_runtime(p) == "onnxruntime")
NO_STSB = ValidationConfig(stsb_pairs=0)
TEXTS = MIXED_TEXTS
# fidelity of the tiny *random* model (random weights are harder to quantize than trained ones)
TINY_MIN_COS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99, "int4": 0.95}


@pytest.fixture(scope="module")
def tiny_encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny_exports(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-tiny")
    return {p: export_onnx(tiny_encoder, root / p, precision=p, validate=NO_STSB) for p in PRECISIONS}


def _inputs(encoder, texts):
    batch = encoder.padded_batch(encoder.tokenize(texts))
    return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "pool_mask")}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_export_matches_torch_at_several_shapes(tiny_encoder, tiny_exports, precision):
    folder = tiny_exports[precision]
    report = json.loads((folder / "export_report.json").read_text())
    assert report["status"] == "ok" and report["precision"] == precision
    assert report["min_cos"] >= report["thresholds"]["min_cos"]
    assert {"mean_cos", "max_abs_err", "file_size_bytes", "shapes"} <= report.keys()
    encoder = OnnxEncoder.from_pretrained(folder, num_threads=2)
    for batch_size in (1, 2, 5):
        got = encoder.encode(TEXTS, batch_size=batch_size, convert_to_numpy=True)
        ref = tiny_encoder.encode(TEXTS, batch_size=batch_size, convert_to_numpy=True)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert cosine_rows(got, ref).min() >= TINY_MIN_COS[precision]


def test_folder_is_self_contained(tiny_encoder, tiny_exports):
    folder = tiny_exports["fp32"]
    config = json.loads((folder / "llm2vec_config.json").read_text())
    assert config["pooling_mode"] == tiny_encoder.pooling_mode and "model_id" in config
    assert config["onnx"]["precision"] == "fp32"
    assert (folder / "tokenizer.json").is_file()
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model)
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "pool_mask"]
    for value in inputs.values():
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    (out,) = model.graph.output
    assert out.name == "sentence_embedding" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int_precisions_use_matmulnbits_and_shrink(tiny_exports):
    sizes = {p: json.loads((tiny_exports[p] / "export_report.json").read_text())["file_size_bytes"] for p in PRECISIONS}
    # the tiny model is mostly its fp16-stored 49152x64 embedding; the 0.35x target is checked on
    # the default model (test_default_model_exports)
    assert sizes["int4"] < 0.55 * sizes["fp32"]
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    assert sizes["int8"] < 0.6 * sizes["fp32"]
    ops = {n.op_type for n in onnx.load(str(tiny_exports["int4"] / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops


def test_int8_runs_calibrated_matmuls_in_int8(tiny_exports):
    """The tiny random Llama is well-behaved: calibration puts every decoder MatMul in int8, and
    the graph holds exactly the reported MatMulIntegerToFloat nodes with GPTQ-rounded int8 weights
    of the bits this CPU multiplies without saturation, fed by one per-token quantization per
    distinct input (q/k/v and gate/up share theirs)."""
    from llm2vec_fast.export.cpu_int8 import WEIGHT_LEVELS
    from onnx import numpy_helper

    folder = tiny_exports["int8"]
    q = json.loads((folder / "export_report.json").read_text())["quantization"]
    model = onnx.load(str(folder / "model.onnx"))
    int8 = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(int8) == q["int8_matmuls"] == 14 and q["fp32_matmuls"] == []  # 2 layers x 7 projections
    assert q["int8_layers"] == [0, 1] and q["fp32_layers"] == q["fp32_layers_alone"] == [] and len(q["layer_sensitivity"]) == 2
    assert "per token" in q["activations"]
    assert q["calibration_min_cos"] >= q["calibration_thresholds"]["min_cos"]
    # the worst-sentence bar follows bf16: max(0.95, min(0.98, bf16's worst)) on the calibration and
    # on the validation texts, the stricter of the two, plus a 0.01 margin, at most 0.99
    bars = [max(0.95, min(0.98, q[k])) for k in ("calibration_bf16_min_cos", "validation_bf16_min_cos")]
    assert q["calibration_thresholds"]["min_cos"] == pytest.approx(min(0.99, max(bars) + 0.01))
    assert q["weight_bits"] == 7 and q["weight_rounding"] == "nearest"  # the defaults
    # all-int8 tried first (torch simulation), then confirmed on the real graph
    assert [(t["int8_layers"], t["engine"]) for t in q["calibration_trials"]] == [(2, "torch"), (2, "onnxruntime")]
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[int8[0].input[1]])
    assert w.dtype == np.int8 and np.abs(w).max() == WEIGHT_LEVELS[q["weight_bits"]]  # 7-bit: no vpmaddubsw saturation on AVX2
    config = json.loads((folder / "llm2vec_config.json").read_text())
    assert config["onnx"]["int8_weight_bits"] == q["weight_bits"]
    assert numpy_helper.to_array(inits[int8[0].input[4]]).tolist() == 128  # u8 codes, zero point 128
    # q/k/v share one quantized input, gate/up another, o_proj and down_proj their own: 4 per layer
    assert sum(n.op_type == "ReduceMax" for n in model.graph.node) == 2 * 4
    assert not any(n.op_type == "MatMul" and n.input[1] in inits and "/layers." in n.name for n in model.graph.node)


def test_int8_gptq_export_stores_gptq_integers(tiny_encoder, tmp_path):
    """With rounding="gptq" the graph's int8 weights are exactly GPTQ's integers (the ones the
    calibration simulated), not a re-rounding of the fp32 weights."""
    from llm2vec_fast.export import Int8Options
    from llm2vec_fast.export.calibrate import calibration_inputs
    from llm2vec_fast.export.cpu_int8 import WEIGHT_LEVELS
    from llm2vec_fast.export.gptq import gptq_decoder_weights
    from onnx import numpy_helper

    folder = export_onnx(
        tiny_encoder, tmp_path / "gptq", precision="int8", validate=False, int8=Int8Options(weights="7bit", rounding="gptq")
    )
    q = json.loads((folder / "export_report.json").read_text())["quantization"]
    assert q["weight_rounding"].startswith("GPTQ") and q["weight_bits"] == 7
    from llm2vec_fast.export.smoothing import smoothed_copy

    smoothed = smoothed_copy(tiny_encoder, calibration_inputs(96))  # the export smooths Llama by default
    expected = gptq_decoder_weights(smoothed, calibration_inputs(96), WEIGHT_LEVELS[7])
    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(nodes) == len(expected) == 14
    for node in nodes:
        name = node.name.removesuffix("_int8")
        np.testing.assert_array_equal(inits[node.input[1]], expected[name][0])
        np.testing.assert_array_equal(inits[node.input[3]], expected[name][1])


def test_int8_fidelity_on_held_out_text(tiny_encoder, tiny_exports):
    """int8 vs torch fp32 on text calibration never saw (STS-B *dev* sample; calibration reads
    *train*), plain and as ``[instruction, text]`` pairs: the int8 precision's thresholds hold."""
    from llm2vec_fast.stsb import load_stsb

    texts = list(dict.fromkeys(s for a, b, _ in load_stsb("dev")[:40] for s in (a, b)))
    pairs = [["Retrieve semantically similar text:", t] for t in texts[:24]]
    onnx_encoder = OnnxEncoder.from_pretrained(tiny_exports["int8"], num_threads=2)
    for inputs in (texts, pairs):
        cos = cosine_rows(
            onnx_encoder.encode(inputs, batch_size=16, convert_to_numpy=True),
            tiny_encoder.encode(inputs, batch_size=16, convert_to_numpy=True),
        )
        assert cos.mean() >= 0.99 and cos.min() >= 0.98, (cos.mean(), cos.min())


def _one_matmul_model(w: np.ndarray, opset: int = 17):
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["y"], name="/proj/MatMul"),
            helper.make_node("MatMul", ["x", "x_t"], ["z"], name="/act/MatMul"),
        ],
        "one",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "l", k]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["b", k, "l"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "l", n]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "l", "l"]),
        ],
        [numpy_helper.from_array(w, "W")],
    )
    # the opset's IR version, as our exports have: onnx's default (its newest IR) fails on older ONNX Runtimes
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 18])
def test_rowwise_int8_isolates_outlier_tokens(opset):
    """One activation scale per token: a token 10,000x larger than the others (an attention sink)
    leaves the other tokens' int8 products as accurate as without it, where one scale per tensor
    (DynamicQuantizeMatMul) wipes them out; an all-zero row stays finite (zeros); a MatMul whose
    second input is not a constant weight is left alone."""
    from llm2vec_fast.export.quantize import dynamic_int8_matmuls, rowwise_int8_matmuls

    rng = np.random.default_rng(0)
    w = rng.normal(size=(97, 200)).astype(np.float32)
    x = rng.normal(size=(2, 5, 97)).astype(np.float32)
    x[0, 0] *= 1e4
    x[1, 4] = 0
    feeds = {"x": x, "x_t": np.swapaxes(x, 1, 2).copy()}
    ref = x @ w

    def rel_err(model):
        onnx.checker.check_model(model)
        y, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        np.testing.assert_allclose(z, x @ feeds["x_t"], rtol=1e-5, atol=1e-2)  # untouched
        assert np.isfinite(y).all() and not y[1, 4].any()
        return np.linalg.norm(y - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-12)

    rowwise = _one_matmul_model(w, opset)
    rowwise = rowwise_int8_matmuls(rowwise, {"/proj/MatMul", "/act/MatMul"})
    assert {n.op_type for n in rowwise.graph.node} >= {"MatMulIntegerToFloat", "QuantizeLinear", "MatMul", "ReduceMax"}
    err = rel_err(rowwise)
    normal = np.ones(err.shape, bool)
    normal[0, 0] = normal[1, 4] = False
    assert err[normal].max() < 0.03 and err[0, 0] < 0.03  # 7-bit weights, 8-bit activations
    per_tensor = rel_err(dynamic_int8_matmuls(_one_matmul_model(w, opset), {"/proj/MatMul"}))
    assert per_tensor[normal].min() > 0.5


def test_int8_simulation_matches_the_graph(tiny_encoder, tiny_exports):
    """Calibration's torch simulation names every decoder Linear by its MatMul in the exported
    graph, computes what the per-token int8 graph computes, and restores the encoder after."""
    import copy

    from llm2vec_fast.export.calibrate import Int8Simulator
    from llm2vec_fast.export.exporter import make_session
    from llm2vec_fast.export.quantize import rowwise_int8_matmuls, weight_matmuls
    from llm2vec_fast.export.wrapper import INPUT_NAMES, OUTPUT_NAME

    fp32_graph = onnx.load(str(tiny_exports["fp32"] / "model.onnx"))
    simulator = Int8Simulator(tiny_encoder)
    layers = simulator.layers
    assert len(layers) == 2 and set().union(*layers) == set(weight_matmuls(fp32_graph))
    inputs = ["A man plays guitar.", "Dogs run in the park.", ["Find a paraphrase of the given sentence", "It rains."]]
    before = tiny_encoder.encode(inputs, convert_to_numpy=True)
    layer1 = set(layers[1])
    simulated = simulator.embed(layer1, inputs)
    items = tiny_encoder.tokenize(inputs)
    batch = tiny_encoder.padded_batch(items)
    session = make_session(rowwise_int8_matmuls(copy.deepcopy(fp32_graph), layer1), Path("unused"), basic=True)
    graph = session.run([OUTPUT_NAME], {n: batch[n].astype(np.int64) for n in INPUT_NAMES})[0]
    int8_effect = np.abs(simulated - before).max()
    assert int8_effect > 1e-3  # the simulation changes something
    # same scheme: QuantizeLinear adds the zero point before rounding in fp32, so a value within
    # ~1e-5 of a half step can land one code away; that is far below the int8 effect itself
    assert np.abs(graph - simulated).max() < 0.1 * int8_effect
    assert cosine_rows(graph, simulated).min() > 0.99999
    np.testing.assert_array_equal(tiny_encoder.encode(inputs, convert_to_numpy=True), before)  # restored
    np.testing.assert_array_equal(simulator.embed(layer1, inputs), simulated)  # cached weights: same result
    sensitivity = simulator.layer_sensitivity(inputs, before)
    assert len(sensitivity) == 2 and all(0.9 < lo <= mean < 1.0 for lo, mean in sensitivity)


def test_select_int8_layers_keeps_the_least_sensitive_passing_prefix():
    """Layers go int8 from the least sensitive up: all first, then a binary search; the graph
    check shortens a prefix the simulation let through."""
    from llm2vec_fast.export.calibrate import select_int8_layers

    layers = [[f"l{i}.q", f"l{i}.k"] for i in range(10)]
    sensitivity = [(0.9999 - 0.001 * i, 1.0) for i in range(10)]  # layer 0 least sensitive ...
    sensitivity[9] = (1.0, 1.0)  # ... but layer 9 measured harmless: goes first
    reference = np.eye(4, dtype=np.float32)

    def model(bad_layers):
        def embed(chosen):
            calls.append(len(chosen) // 2)
            out = reference.copy()
            out[0, 1] = 0.5 * sum(f"l{i}.q" in chosen for i in bad_layers)
            return out

        return embed

    calls: list[int] = []
    chosen, summary = select_int8_layers(layers, sensitivity, model({6, 8}), reference, min_cos=0.99, mean_cos=0.99)
    assert chosen == {n for i in (9, 0, 1, 2, 3, 4, 5) for n in layers[i]}
    assert summary["int8_layers"] == [0, 1, 2, 3, 4, 5, 9] and summary["fp32_layers"] == [6, 7, 8]
    assert calls[0] == 10 and len(calls) <= 5  # all-int8 first, then a binary search
    calls.clear()
    chosen, summary = select_int8_layers(layers, sensitivity, model({6, 8}), reference, confirm=model({4}), min_cos=0.99, mean_cos=0.99)
    assert summary["int8_layers"] == [0, 1, 2, 3, 9]  # the graph disagreed on layer 4
    assert [t["engine"] for t in summary["calibration_trials"]][-3:] == ["onnxruntime"] * 3
    chosen, summary = select_int8_layers(layers, sensitivity, lambda c: reference, reference)
    assert len(chosen) == 20 and summary["calibration_trials"] == [{"int8_layers": 10, "engine": "torch", "min_cos": 1.0, "mean_cos": 1.0}]
    # a layer that fails alone is never tried
    calls.clear()
    sensitivity[3] = (0.5, 0.9)
    chosen, summary = select_int8_layers(layers, sensitivity, model({6, 8}), reference, min_cos=0.99, mean_cos=0.99)
    assert summary["fp32_layers_alone"] == [3] and summary["int8_layers"] == [0, 1, 2, 4, 5, 9] and calls[0] == 9


def test_int8_weight_quantization_is_symmetric_7bit():
    from llm2vec_fast.export.quantize import quantize_columns

    rng = np.random.default_rng(0)
    w = rng.normal(size=(97, 33)).astype(np.float32) * rng.uniform(0.01, 10, size=33).astype(np.float32)
    q, scale = quantize_columns(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 63 and scale.shape == (33,)
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-6)


def test_graph_is_bidirectional(tiny_encoder, tiny_exports):
    """Pooling only the first token, changing the last token must change the embedding."""
    session = ort.InferenceSession(str(tiny_exports["fp32"] / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[100, 200, 300, 400], [100, 200, 300, 999]], dtype=np.int64)
    mask = np.ones_like(ids)
    pool = np.zeros_like(ids)
    pool[:, 0] = 1
    (out,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "pool_mask": pool})
    assert np.abs(out[0] - out[1]).max() > 1e-4
    with torch.no_grad():
        ref = tiny_encoder(
            {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "pool_mask": torch.from_numpy(pool)}
        )
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4)


def test_padding_and_positions_per_sequence(tiny_exports):
    """A right-padded row gives the same embedding as the row alone."""
    session = ort.InferenceSession(str(tiny_exports["fp32"] / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 2, 2]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    (batch,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "pool_mask": mask})
    (alone,) = session.run(None, {"input_ids": ids[1:, :3], "attention_mask": mask[1:, :3], "pool_mask": mask[1:, :3]})
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_fully_padded_row_is_finite(tiny_exports, precision):
    session = ort.InferenceSession(str(tiny_exports[precision] / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 6, 7], [2, 2, 2]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [0, 0, 0]], dtype=np.int64)
    (out,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "pool_mask": mask})
    assert np.isfinite(out).all()
    assert not out[1].any()  # nothing pooled -> zeros, as masked_pool_reference
    (pooled,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "pool_mask": np.ones_like(mask)})
    assert np.isfinite(pooled).all()


@pytest.mark.parametrize("pooling", ["weighted_mean", "last_token", "eos_token", "bos_token"])
def test_pooling_modes(tiny_llama_dir, tmp_path, pooling):
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", pooling_mode=pooling)
    folder = export_onnx(encoder, tmp_path / "m", validate=NO_STSB)
    onnx_encoder = OnnxEncoder.from_pretrained(folder)
    assert onnx_encoder.pooling_mode == pooling
    got = onnx_encoder.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    np.testing.assert_allclose(got, encoder.encode(TEXTS, batch_size=3, convert_to_numpy=True), atol=2e-4)


def test_causal_encoder_exports_causal(tiny_llama_dir, tmp_path):
    """``enable_bidirectional=False`` (a plain decoder with last-token pooling): the graph keeps the
    causal mask (it was exported bidirectional: validation failed at 0.94, unvalidated it was wrong)."""
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", pooling_mode="last_token", enable_bidirectional=False)
    folder = export_onnx(encoder, tmp_path / "causal", validate=NO_STSB)
    got = OnnxEncoder.from_pretrained(folder).encode(TEXTS, batch_size=3, convert_to_numpy=True)
    np.testing.assert_allclose(got, encoder.encode(TEXTS, batch_size=3, convert_to_numpy=True), atol=2e-4)


def test_phi3_longrope_exports_and_saves(tmp_path, smollm_tokenizer):
    """Phi-3 with LongRoPE (128k variants): transformers switches frequencies with an in-place copy
    the exporter cannot write; the graph chooses them itself, per batch, like the torch model (short
    below original_max_position_embeddings, long above). Phi-3's own stacked qkv_proj / gate_up_proj
    are not fused projections: the encoder saves."""
    from conftest import tiny_config
    from transformers import AutoModel

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}
    config = tiny_config("phi3", max_position_embeddings=512, rope_parameters={**rope, "original_max_position_embeddings": 32})
    AutoModel.from_config(config).save_pretrained(tmp_path / "phi3")
    smollm_tokenizer.save_pretrained(tmp_path / "phi3")
    encoder = LLM2Vec.from_pretrained(str(tmp_path / "phi3"), device="cpu")
    encoder.save(tmp_path / "saved")  # refused before: qkv_proj read as our fused projection
    folder = export_onnx(encoder, tmp_path / "onnx", validate=NO_STSB)
    onnx_encoder = OnnxEncoder.from_pretrained(folder)
    for texts in (["a short one", "two words"], ["a long text " * 20, "short"]):  # under and over 32 positions
        np.testing.assert_allclose(
            onnx_encoder.encode(texts, convert_to_numpy=True), encoder.encode(texts, convert_to_numpy=True), atol=2e-4
        )


def test_causal_sliding_window_encoder_is_refused_past_its_window(tmp_path, smollm_tokenizer):
    from conftest import tiny_config
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("mistral", sliding_window=8)).eval()  # not made bidirectional: causal
    encoder = LLM2Vec(model, smollm_tokenizer, pooling_mode="last_token", max_length=64)
    with pytest.raises(NotExportableError, match="sliding window of 8 tokens"):
        export_onnx(encoder, tmp_path / "m", validate=False)
    encoder.max_length = 8  # within the window: the causal mask is the model's
    folder = export_onnx(encoder, tmp_path / "m", validate=NO_STSB)
    texts = ["a b c", "one two three four five six seven eight nine"]
    np.testing.assert_allclose(
        OnnxEncoder.from_pretrained(folder).encode(texts, convert_to_numpy=True), encoder.encode(texts, convert_to_numpy=True), atol=2e-4
    )


def test_fused_and_fp8_encoders_are_refused_up_front(tiny_llama_dir, tmp_path):
    for options in (dict(fused=True), dict(quantization="fp8-simulated", high_precision_layers=[], fp8_rounding="nearest")):
        encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", **options)
        with pytest.raises(NotExportableError, match="fused layers|quantization='fp8-simulated'"):
            export_onnx(encoder, tmp_path / "m", validate=False)
        assert not (tmp_path / "m").exists()


def test_encode_api_matches_llm2vec(tiny_encoder, tiny_exports):
    encoder = OnnxEncoder.from_pretrained(tiny_exports["fp32"])
    single = encoder.encode("Hello world.")
    assert isinstance(single, torch.Tensor) and single.shape == (tiny_encoder.hidden_size,)
    normed = encoder.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        encoder.encode([])
    with pytest.raises(TypeError):
        encoder.encode([1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(TEXTS, batch_size=0)


def test_encode_progress_batching_and_errors_match_llm2vec(tiny_encoder, tiny_exports, capsys):
    """OnnxEncoder.encode shares LLM2Vec.encode's code (EncodeMixin): same progress bar, batches
    and exceptions."""
    onnx_encoder = OnnxEncoder.from_pretrained(tiny_exports["fp32"], num_threads=1)
    texts = [f"sentence number {i} " * (1 + i % 4) for i in range(11)]
    for encoder in (tiny_encoder, onnx_encoder):
        encoder.encode(texts, batch_size=1)  # 11 batches > 10: a bar by default
        assert "Encoding" in capsys.readouterr().err
        encoder.encode(texts, batch_size=2)  # 6 batches: none
        encoder.encode(texts, batch_size=1, show_progress_bar=False)
        assert "Encoding" not in capsys.readouterr().err
    items = tiny_encoder.tokenize(texts)
    assert tiny_encoder._batches(items, 4) == onnx_encoder._batches(onnx_encoder.tokenize(texts), 4)
    bad = [
        ([], {}),
        ([1, 2], {}),
        ([["only instruction"]], {}),
        (texts, {"batch_size": 0}),
        (texts, {"batch_size": True}),
        (texts, {"batch_size": 2.5}),
    ]
    for inputs, kwargs in bad:
        with pytest.raises(Exception) as torch_err:
            tiny_encoder.encode(inputs, **kwargs)
        with pytest.raises(Exception) as onnx_err:
            onnx_encoder.encode(inputs, **kwargs)
        assert type(onnx_err.value) is type(torch_err.value), (inputs, kwargs)
        assert str(onnx_err.value) == str(torch_err.value)


def test_missing_provider_is_explained(tiny_exports):
    with pytest.raises(ValueError, match=r"CUDAExecutionProvider.*available providers.*onnx-gpu"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            raise ValueError("CUDAExecutionProvider available providers onnx-gpu")  # pragma: no cover
        OnnxEncoder.from_pretrained(tiny_exports["fp32"], providers="cuda")
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        OnnxEncoder.from_pretrained(tiny_exports["fp32"], providers=["NoSuchExecutionProvider"])


def test_bad_inputs_are_rejected(tiny_encoder, tiny_exports, tmp_path):
    with pytest.raises(ValueError, match="unknown precision"):
        export_onnx(tiny_encoder, tmp_path / "a", precision="int3")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(tiny_encoder, tiny_exports["fp32"], validate=False)
    with pytest.raises(NotExportableError):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "b")
    assert isinstance(NotExportableError("x"), TypeError)
    stranger = tmp_path / "not-an-export"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like"):
        export_onnx(tiny_encoder, stranger, overwrite=True, validate=False)
    assert (stranger / "notes.txt").read_text() == "keep me"
    # a saved encoder (llm2vec_config.json, weights) is never replaced, even with overwrite
    saved = tmp_path / "saved-encoder"
    tiny_encoder.save(saved)
    before = sorted(p.name for p in saved.iterdir())
    with pytest.raises(FileExistsError, match="does not look like|model or adapter files"):
        export_onnx(tiny_encoder, saved, overwrite=True, validate=False)
    (saved / "model.onnx").write_bytes(b"")  # even next to a stray graph file
    with pytest.raises(FileExistsError, match="model or adapter files"):
        export_onnx(tiny_encoder, saved, overwrite=True, validate=False)
    assert set(before) <= {p.name for p in saved.iterdir()}
    with pytest.raises(FileNotFoundError):
        OnnxEncoder.from_pretrained(tmp_path / "missing")
    for pairs in (1, -1):  # refused before any export work (a correlation needs two pairs)
        with pytest.raises(ValueError, match="stsb_pairs must be 0"):
            ValidationConfig(stsb_pairs=pairs)
    import shutil

    for dropped, named in (("tokenizer.json", "tokenizer.json or"), ("llm2vec_config.json", "llm2vec_config.json")):
        partial = tmp_path / f"partial-{dropped}"
        shutil.copytree(tiny_exports["fp32"], partial)
        (partial / dropped).unlink()
        with pytest.raises(FileNotFoundError, match=f"is incomplete: no .*{named}"):
            OnnxEncoder.from_pretrained(partial)


def test_non_fp32_encoder_is_rejected(tiny_llama_dir, tmp_path):
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp32"):
        export_onnx(encoder, tmp_path / "m")


def test_overwrite_and_external_data(tiny_encoder, tmp_path, monkeypatch):
    folder = export_onnx(tiny_encoder, tmp_path / "m", validate=False)
    assert json.loads((folder / "export_report.json").read_text())["status"] == "not validated"
    monkeypatch.setattr(exporter_module, "EXTERNAL_DATA_BYTES", 1)  # pretend the model is over 2 GB
    folder = export_onnx(tiny_encoder, folder, overwrite=True, validate=NO_STSB)
    assert (folder / "model.onnx.data").is_file()
    assert (folder / "model.onnx").stat().st_size < (folder / "model.onnx.data").stat().st_size
    got = OnnxEncoder.from_pretrained(folder).encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(got, tiny_encoder.encode(TEXTS, convert_to_numpy=True), atol=2e-4)


def test_failed_validation_raises_and_reports(tiny_encoder, tmp_path, monkeypatch):
    from llm2vec_fast.export import precisions, validate

    strict = dict(precisions.THRESHOLDS, fp32=precisions.Thresholds(min_cos=1.5, mean_cos=1.5, max_spearman_drop=0.0))
    monkeypatch.setattr(validate, "THRESHOLDS", strict)
    monkeypatch.setattr(exporter_module, "THRESHOLDS", strict)
    with pytest.raises(ExportValidationError, match="fidelity"):
        export_onnx(tiny_encoder, tmp_path / "m", validate=NO_STSB)
    report = json.loads((tmp_path / "m" / "export_report.json").read_text())
    assert report["status"] == "failed" and report["failures"]


def test_cli_export(tiny_llama_dir, tmp_path, capsys):
    from llm2vec_fast.cli import main

    out = tmp_path / "cli"
    args = ["export", "--model", tiny_llama_dir, "--precision", "int4", "--output", str(out), "--stsb-pairs", "0"]
    assert main(args) == 0
    assert json.loads((out / "export_report.json").read_text())["status"] == "ok"
    err = capsys.readouterr().err
    for step in ("loading the encoder", "exporting the int4 graph", "quantization", "validation", "done"):
        assert step in err, err
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_cli_eval_scores_an_onnx_folder(tiny_encoder, tiny_exports, tmp_path, capsys):
    """``eval sts --onnx DIR`` (or the folder as ``--model``) scores the export through OnnxEncoder:
    the same Spearman as stsb_spearman on that OnnxEncoder, not the torch encoder's."""
    import re

    from llm2vec_fast.cli import main
    from llm2vec_fast.stsb import stsb_spearman

    folder = tiny_exports["int8"]
    expected = stsb_spearman(OnnxEncoder.from_pretrained(folder, num_threads=1), "dev", limit=40)
    assert abs(expected - stsb_spearman(tiny_encoder, "dev", limit=40)) > 1e-4  # int8 scores differently
    for args in (["--onnx", str(folder)], ["--model", str(folder)]):
        assert main(["eval", "sts", "--limit", "40", "--threads", "1", *args]) == 0
        printed = float(re.search(r"Spearman x100: ([-\d.]+)", capsys.readouterr().out).group(1))
        assert abs(printed - expected) < 0.01
    assert main(["eval", "sts", "--onnx", str(folder), "--peft", "adapter"]) == 2
    assert "--peft cannot change an ONNX export" in capsys.readouterr().err
    assert main(["eval", "sts", "--onnx", str(tmp_path)]) == 2
    assert "holds no model.onnx" in capsys.readouterr().err
    assert main(["eval", "mteb", "--tasks", "NoSuchTask", "--onnx", str(folder)]) == 2


def test_nothing_imports_a_top_level_export_module():
    """``export/`` installs as ``llm2vec_fast.export`` only; nothing may import ``export`` itself."""
    import re
    from pathlib import Path

    import llm2vec_fast.export as package

    root = Path(package.__file__).resolve().parent.parent
    pattern = re.compile(r"^\s*(from\s+export[\s.]|import\s+export\b)", re.M)
    offenders = [
        str(f) for d in ("export", "llm2vec_fast", "benchmarks", "tests") for f in (root / d).rglob("*.py") if pattern.search(f.read_text())
    ]
    assert offenders == []
    assert package.__name__ == "llm2vec_fast.export"


# ------------------------------------------------------------------------------ bench_onnx
def _bench_module(name: str = "bench_onnx"):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_int8_gemm_smoke(tmp_path):
    """The int8 GEMM roofline runs every decoder shape and reports speed-ups from the same run."""
    out = tmp_path / "gemm.json"
    assert _bench_module("bench_int8_gemm").main(["--quick", "--tokens", "32", "--threads", "1", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["matmul"] for r in rows] == ["q/o_proj", "k/v_proj", "gate/up_proj", "down_proj"]
    assert all(r["fp32_gflops"] > 0 and r["MatMulIntegerToFloat_speedup"] > 0 and r["DynamicQuantizeMatMul_speedup"] > 0 for r in rows)


def _fake_result(speedup: float) -> dict:
    row = dict(
        sentences_per_s=40.0,
        speedup_vs_torch_fp32=1.0,
        speedup_min=1.0,
        speedup_max=1.0,
        mean_cos=1.0,
        min_cos=1.0,
        min_cos_instructions=1.0,
        stsb_dev_spearman=70.0,
    )
    onnx_row = dict(
        row,
        engine="onnx-int8",
        sentences_per_s=40.0 * speedup,
        speedup_vs_torch_fp32=speedup,
        speedup_min=speedup - 0.1,
        speedup_max=speedup + 0.1,
        mean_cos=0.995,
        min_cos=0.985,
        min_cos_instructions=0.99,
        stsb_drop=0.3,
        size_mb=221.0,
        export_s=80.0,
        int8_layers=30,
        layers=30,
        int8_weight_bits=8,
        int8_weight_rounding="GPTQ (sequential, act-order)",
    )
    bf16_row = dict(row, engine="torch-bf16", mean_cos=0.997, min_cos=0.93, min_cos_instructions=0.95, stsb_drop=0.1)
    return {
        "model": "m",
        "cpu": "c",
        "cpu_flags": ["avx2"],
        "threads": 2,
        "batch_size": 32,
        "sentences": 256,
        "rounds": 5,
        "load_average_per_round": [0.1, 2.2],
        "baseline_check": {"encode_s_over_plain_forward_s": 1.02},
        "date": "d",
        "results": [dict(row, engine="torch-fp32"), bf16_row, onnx_row],
        "int8_gemm_ceiling": {"rows": [{"MatMulIntegerToFloat_speedup": 1.5}, {"MatMulIntegerToFloat_speedup": 6.25}]},
    }


def test_bench_onnx_docs_table_is_generated_from_json(tmp_path):
    bench = _bench_module()
    results = tmp_path / "results"
    results.mkdir()
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "intro\n<!-- bench_onnx:start -->\nold hand-typed numbers\n<!-- bench_onnx:end -->\n"
        "<!-- bench_onnx_trained:start -->\n<!-- bench_onnx_trained:end -->\ntail\n"
    )
    (results / "onnx-cpu.json").write_text(json.dumps(_fake_result(2.34)))
    bench.update_docs(page, results)
    text = page.read_text()
    assert "old hand-typed" not in text and text.startswith("intro\n") and text.endswith("tail\n")
    assert "| onnx-int8 | 93.6 | 2.34x (2.24-2.44) | 0.9950 | 0.9850 / 0.9900 | 70.00 (+0.30) | 221 MB | 80 s |" in text
    assert "| torch-bf16 | 40.0 | 1.00x (1.00-1.00) | 0.9970 | 0.9300 / 0.9500 | 70.00 (+0.10) | - | - |" in text
    assert "onnx-int8: 30 of 30 decoder layers in int8, 8-bit weights (GPTQ (sequential, act-order) rounding)." in text
    assert "MatMulIntegerToFloat vs fp32 MatMul): 1.5-6.2x" in text
    assert "no `" in text.split("bench_onnx_trained:start")[1]  # missing trained JSON: a note, no numbers
    bench.update_docs(page, results)
    assert page.read_text() == text  # idempotent


def test_bench_onnx_smoke_on_a_tiny_model(tiny_llama_dir, tmp_path, capsys):
    """--force on a tiny model: torch fp32, bf16 and int8 rows, with the CPU, its int8 flags and
    what the int8 export chose in the JSON (written outside benchmarks/results)."""
    import re

    bench = _bench_module()
    argv = ["--model", tiny_llama_dir, "--quick", "--force", "--sentences", "12", "--stsb-pairs", "20", "--threads", "1"]
    assert bench.main([*argv, "--export-dir", str(tmp_path / "exports")]) == 0
    captured = capsys.readouterr()
    result = json.loads(Path(re.search(r"see (\S+onnx-cpu\.json)", captured.err).group(1)).read_text())
    engines = [r["engine"] for r in result["results"]]
    assert engines[:3] == ["torch-fp32", "torch-bf16", "onnx-int8"]
    assert engines[3:] == (["openvino-int8"] if result["versions"]["openvino"] else [])
    assert result["cpu"] and isinstance(result["cpu_flags"], list)
    bf16, int8 = result["results"][1:3]
    assert 0.5 < bf16["min_cos"] <= bf16["mean_cos"] <= 1 and "size_mb" not in bf16
    assert int8["int8_layers"] == int8["layers"] == 2 and int8["int8_weight_bits"] in (7, 8)
    assert "| torch-bf16 |" in captured.out


def test_bench_onnx_refuses_a_busy_machine(monkeypatch, tmp_path):
    bench = _bench_module()
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    with pytest.raises(bench.BusyMachineError, match="busy"):
        bench.check_load(2, running=False)
    with pytest.raises(bench.BusyMachineError):
        bench.check_load(2, running=True)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (2.3, 2.0, 2.0))
    assert bench.check_load(2, running=True) == 2.3  # our own two threads are allowed
    with pytest.raises(bench.BusyMachineError):
        bench.check_load(2, running=False)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert bench.main(["--quick", "--wait", "0"]) == 3  # refuses before loading anything, writes nothing


# ------------------------------------------------------------------------------ default model
@pytest.fixture(scope="module")
def default_exports(default_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-default")
    return {p: export_onnx(default_encoder, root / p, precision=p, validate=ValidationConfig(stsb_pairs=50)) for p in PRECISIONS}


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_default_model_exports(default_encoder, default_exports, precision):
    from llm2vec_fast.stsb import load_stsb

    folder = default_exports[precision]
    report = json.loads((folder / "export_report.json").read_text())
    assert report["status"] == "ok"
    pairs = load_stsb("dev")[150:250]  # text neither calibration (train) nor validation (dev[:50]) saw
    texts = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    got = OnnxEncoder.from_pretrained(folder, num_threads=2).encode(texts, convert_to_numpy=True)
    cos = cosine_rows(got, default_encoder.encode(texts, convert_to_numpy=True))
    target_min = {"fp32": 0.9999, "fp16": 0.99, "int8": 0.98, "int4": 0.95}[precision]
    assert cos.mean() >= 0.99 and cos.min() >= target_min
    if precision == "int4":
        fp32_size = json.loads((default_exports["fp32"] / "export_report.json").read_text())["file_size_bytes"]
        assert report["file_size_bytes"] <= 0.35 * fp32_size


def _failing_above(max_int8_matmuls: int):
    """``check_report`` that also fails any int8 graph with more than ``max_int8_matmuls`` int8 MatMuls
    (stands in for held-out text that calibration was too optimistic about)."""
    real = exporter_module.check_report

    def check(report):
        extra = [] if report["quantization"]["int8_matmuls"] <= max_int8_matmuls else ["too many int8 layers for this text"]
        return real(report) + extra

    return check


def test_int8_validation_fallback_puts_the_most_sensitive_layers_back_in_fp32(tiny_encoder, tmp_path, monkeypatch):
    """A graph that misses validation is rebuilt with the calibration order's tail in fp32 and
    validated again; the report, the config and the graph agree on what is int8."""
    monkeypatch.setattr(exporter_module, "check_report", _failing_above(7))  # one layer (7 MatMuls) passes
    folder = export_onnx(tiny_encoder, tmp_path / "fallback", precision="int8", validate=NO_STSB)
    report = json.loads((folder / "export_report.json").read_text())
    q = report["quantization"]
    assert report["status"] == "ok" and report["failures"] == []
    assert [t["int8_layers"] for t in q["validation_fallback"]] == [2]
    assert q["validation_fallback"][0]["failures"] == ["too many int8 layers for this text"]
    first = q["calibration_trials"][-1]  # calibration still chose both layers
    assert first["int8_layers"] == 2 and len(q["layer_sensitivity"]) == 2
    assert q["int8_matmuls"] == 7 and len(q["int8_layer_order"]) == 1 and q["int8_layers"] == q["int8_layer_order"]
    assert q["fp32_layers"] == [1 - q["int8_layers"][0]] and len(q["fp32_matmuls"]) == 7
    model = onnx.load(str(folder / "model.onnx"))
    int8_nodes = {n.name.removesuffix("_int8") for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert len(int8_nodes) == 7 and all(f"layers.{q['int8_layers'][0]}/" in n for n in int8_nodes)
    assert not int8_nodes & set(q["fp32_matmuls"])
    # the final graph is what was validated
    from llm2vec_fast.export.validate import compare

    assert compare(tiny_encoder, OnnxEncoder.from_pretrained(folder, num_threads=2))["min_cos"] == pytest.approx(
        report["min_cos"], abs=1e-6
    )


def test_validation_fails_a_graph_that_is_wrong_only_on_other_scripts(tiny_encoder):
    """Calibration scores English STS-B sentences; validation must also score other scripts, or a
    graph that is right on English prose and wrong elsewhere would pass."""
    from llm2vec_fast.export.validate import check_report, compare

    class WrongOnOtherScripts:
        def encode(self, inputs, **kwargs):
            out = np.asarray(tiny_encoder.encode(inputs, **kwargs)).copy()
            for i, item in enumerate(inputs):
                text = item[-1] if isinstance(item, (list, tuple)) else item
                if any(ord(ch) >= 0x400 for ch in text):  # Cyrillic, CJK, emoji
                    out[i] = -out[i]
            return out

    report = compare(tiny_encoder, WrongOnOtherScripts())
    assert report["min_cos"] < 0 and report["mean_cos"] < 0.99
    assert check_report({"precision": "int8", **report})
    assert compare(tiny_encoder, tiny_encoder)["min_cos"] > 0.9999


def test_int8_validation_fallback_gives_up_without_int8_layers(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(exporter_module, "check_report", _failing_above(0))
    with pytest.raises(ExportValidationError, match="too many int8 layers"):
        export_onnx(tiny_encoder, tmp_path / "never", precision="int8", validate=NO_STSB)
    report = json.loads((tmp_path / "never" / "export_report.json").read_text())
    assert report["status"] == "failed"
    assert [t["int8_layers"] for t in report["quantization"]["validation_fallback"]] == [2, 1]


def test_int8_validation_fallback_can_be_turned_off(tiny_encoder, tmp_path, monkeypatch):
    from llm2vec_fast.export import Int8Options

    monkeypatch.setattr(exporter_module, "check_report", _failing_above(7))
    with pytest.raises(ExportValidationError):
        export_onnx(tiny_encoder, tmp_path / "strict", precision="int8", validate=NO_STSB, int8=Int8Options(validation_fallback=False))
    q = json.loads((tmp_path / "strict" / "export_report.json").read_text())["quantization"]
    assert "validation_fallback" not in q and q["int8_matmuls"] == 14


def test_bench_onnx_refuses_an_int8_openvino_export_made_with_other_options(tmp_path):
    """A reused --export-dir folder is timed only if it was exported with the options asked for,
    weight bits included (a report without them is an export from before they existed: group 32, no fp32 layers asked,
    nearest rounding)."""
    bench = _bench_module()
    folder = tmp_path / "int8-openvino"
    folder.mkdir()
    report = {
        "quantization": {
            "activation_group_size": 64,
            "fp32_layers_asked": 3,
            "weight_rounding": "GPTQ (sequential, act-order)",
            "weight_bits": 8,
        }
    }
    (folder / "export_report.json").write_text(json.dumps(report))
    bench.check_reused_openvino_export(folder, {"activation_group_size": 64, "fp32_layers": 3, "rounding": None})
    bench.check_reused_openvino_export(folder, {"activation_group_size": 64, "fp32_layers": 3, "rounding": "gptq"})
    bench.check_reused_openvino_export(folder, {"activation_group_size": None, "fp32_layers": 3, "rounding": None})  # 64: the default
    for other in (
        {"activation_group_size": 32, "fp32_layers": 3, "rounding": None},
        {"activation_group_size": 64, "fp32_layers": 0, "rounding": None},
        {"activation_group_size": 64, "fp32_layers": None, "rounding": None},
        {"activation_group_size": 64, "fp32_layers": 3, "rounding": "nearest"},
        {"activation_group_size": 64, "fp32_layers": 3, "rounding": None, "weights": "7bit"},  # int8-openvino's weights: 8-bit
    ):
        with pytest.raises(SystemExit, match="was exported with"):
            bench.check_reused_openvino_export(folder, other)
    # a folder from before the group size and rounding were recorded: group 32, nearest
    (folder / "export_report.json").write_text(json.dumps({"quantization": {"weight_bits": 7}}))
    bench.check_reused_openvino_export(folder, {"activation_group_size": 32, "fp32_layers": 0, "rounding": "nearest", "weights": "7bit"})
    with pytest.raises(SystemExit, match="was exported with"):
        bench.check_reused_openvino_export(folder, {"activation_group_size": 32, "fp32_layers": 0, "rounding": None})
    facts = bench.export_facts(folder)
    assert "openvino_activation_group_size" not in facts


def test_bench_onnx_table_names_the_openvino_activation_group():
    bench = _bench_module()
    result = _fake_result(2.5)
    result["results"].append(dict(result["results"][-1], engine="openvino-int8-openvino", openvino_activation_group_size=64))
    text = bench.render_table(result)
    assert (
        "openvino-int8-openvino: 30 of 30 decoder layers in int8, 8-bit weights (GPTQ (sequential, act-order) rounding), activations in groups of 64 channels."
        in text
    )
    assert "onnx-int8: 30 of 30 decoder layers in int8, 8-bit weights (GPTQ (sequential, act-order) rounding).\n" in text + "\n"


def test_bench_onnx_table_compares_every_engine_with_onnxruntime_fp32_too():
    """With an onnx-fp32 row in the run, the table adds each engine's speed against it (torch's
    fp32 GEMM library may not use the whole CPU: MKL ran AVX2 kernels on a Zen 5 EPYC)."""
    bench = _bench_module()
    result = _fake_result(4.0)
    result["results"].append(dict(result["results"][-1], engine="onnx-fp32", sentences_per_s=80.0, speedup_vs_torch_fp32=2.0))
    text = bench.render_table(result)
    assert "vs ONNX Runtime fp32 (median rounds, same run): torch-fp32 0.50x, torch-bf16 0.50x, onnx-int8 2.00x." in text
    assert "vs ONNX Runtime fp32" not in bench.render_table(_fake_result(4.0))


def test_int8_gemm_ceiling_is_the_file_measured_on_this_cpu(tmp_path):
    """Every ``int8-gemm-cpu*.json`` is a candidate; the one whose CPU name and flags match is used."""
    bench = _bench_module()
    for name, cpu, flags in (
        ("int8-gemm-cpu.json", "AMD EPYC (family 26, model 2)", ["avx512_vnni", "avx_vnni"]),
        ("int8-gemm-cpu-epyc-zen4.json", "AMD EPYC", ["avx512_vnni"]),
    ):
        (tmp_path / name).write_text(json.dumps({"cpu": cpu, "cpu_flags": flags, "threads": 2, "rows": [{"m": name}]}))
    zen4 = bench.int8_gemm_ceiling("AMD EPYC", ["avx512_vnni"], tmp_path)
    assert zen4["file"] == "benchmarks/results/int8-gemm-cpu-epyc-zen4.json" and zen4["rows"] == [{"m": "int8-gemm-cpu-epyc-zen4.json"}]
    zen5 = bench.int8_gemm_ceiling("AMD EPYC (family 26, model 2)", ["avx_vnni", "avx512_vnni"], tmp_path)
    assert zen5["file"] == "benchmarks/results/int8-gemm-cpu.json"
    assert bench.int8_gemm_ceiling("AMD EPYC", ["avx2"], tmp_path) is None
    assert bench.int8_gemm_ceiling("Intel Xeon", None, tmp_path) is None


def test_cpu_name_carries_family_and_model(monkeypatch, tmp_path):
    """A VM's "AMD EPYC" covers Zen 2 to Zen 5: the name carries the family and model numbers."""
    from llm2vec_fast.export import cpu_int8

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f\n")
    monkeypatch.setattr(cpu_int8, "Path", lambda _path: info)
    assert cpu_int8.cpu_name() == "AMD EPYC (family 26, model 2)"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert cpu_int8.cpu_name() == "Some CPU"


def test_int8_weight_bits_and_openvino_activations_follow_the_cpu():
    """ONNX Runtime's int8 GEMM saturates 8-bit weights without VNNI/AMX, so int8's ``auto`` is 8-bit
    only with them; OpenVINO never saturates (VNNI, or fp32 from widened weights), so ``auto`` is
    8-bit for it everywhere; OpenVINO quantizes activations on x86 only with AVX-VNNI or AVX-512 VNNI."""
    from llm2vec_fast.export.cpu_int8 import int8_weight_bits, openvino_quantizes_activations

    avx2, zen4, alder_lake = {"avx2", "fma"}, {"avx2", "avx512f", "avx512_vnni"}, {"avx2", "avx_vnni"}
    assert [int8_weight_bits("auto", flags) for flags in (avx2, zen4, alder_lake)] == [7, 8, 8]
    assert [int8_weight_bits("auto", flags, runtime="openvino") for flags in (avx2, zen4, alder_lake)] == [8, 8, 8]
    assert int8_weight_bits("7bit", zen4, runtime="openvino") == 7 and int8_weight_bits("8bit", avx2) == 8
    assert [openvino_quantizes_activations(flags, "x86_64") for flags in (avx2, zen4, alder_lake)] == [False, True, True]
    assert openvino_quantizes_activations({"avx2", "amx_int8", "avx512_vnni"}, "AMD64")
    assert openvino_quantizes_activations(set(), "aarch64")  # not measured elsewhere: no warning
    with pytest.raises(ValueError, match="must be one of"):
        int8_weight_bits("9bit")


def test_bf16_copy_sums_linear_products_in_fp32_where_bf16_gemms_are_slow(tiny_encoder, monkeypatch):
    """The bf16 bar's copy runs its linear layers through fp32 GEMMs on CPUs without bf16
    instructions: bf16 inputs and weights, fp32 sums, a bf16 result, as torch's bf16 GEMM computes
    (one bf16 ulp apart at most, rarely); with bf16 instructions, or asked, torch's own bf16."""
    import torch
    from llm2vec_fast.export import cpu_int8
    from llm2vec_fast.export.calibrate import Fp32AccumulatedBf16Linear, bf16_copy
    from torch import nn

    assert cpu_int8.has_bf16_gemm({"avx2", "avx512_bf16"}, "x86_64") and cpu_int8.has_bf16_gemm({"amx_bf16"}, "x86_64")
    assert not cpu_int8.has_bf16_gemm({"avx2", "avx512_vnni"}, "x86_64") and cpu_int8.has_bf16_gemm(set(), "aarch64")

    torch.manual_seed(0)
    native = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(33, 64).to(torch.bfloat16)
    emulated = nn.Linear(64, 48).to(torch.bfloat16)
    emulated.load_state_dict(native.state_dict())
    emulated.__class__ = Fp32AccumulatedBf16Linear
    got, want = emulated(x), native(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    ulp = (want.float().abs() * 2**-7).clamp(min=1e-30)
    assert ((got.float() - want.float()).abs() <= ulp).all()

    def linear_types(encoder):
        return {type(m) for m in encoder.model.modules() if isinstance(m, nn.Linear)}

    monkeypatch.setattr(cpu_int8, "has_bf16_gemm", lambda flags=None, machine=None: False)
    slow_cpu = bf16_copy(tiny_encoder)
    assert linear_types(slow_cpu) == {Fp32AccumulatedBf16Linear}
    assert next(slow_cpu.model.parameters()).dtype == torch.bfloat16
    assert linear_types(bf16_copy(tiny_encoder, fp32_accumulated_linears=False)) == {nn.Linear}
    assert linear_types(tiny_encoder) == {nn.Linear}  # the encoder itself is untouched
    monkeypatch.setattr(cpu_int8, "has_bf16_gemm", lambda flags=None, machine=None: True)
    assert linear_types(bf16_copy(tiny_encoder)) == {nn.Linear}
    texts = TEXTS + [["Find a paraphrase of the given sentence", "It rains."]]
    fp32 = tiny_encoder.encode(texts, convert_to_numpy=True)
    own = bf16_copy(tiny_encoder, fp32_accumulated_linears=False).encode(texts, convert_to_numpy=True)
    summed = slow_cpu.encode(texts, convert_to_numpy=True)
    assert cosine_rows(summed, own).min() > 0.9999  # the same bf16 arithmetic
    assert cosine_rows(summed, fp32).min() < 0.99999  # and still bf16's error


def test_int8_perturbation_script_compares_graph_and_simulation(tiny_llama_dir, tiny_exports, tmp_path, capsys):
    """benchmarks/int8_perturbation.py simulates the int8 export's own integers (read from the
    graph) on the export's smoothed encoder: unperturbed, it computes what the graph computes;
    perturbed draws move the cosines; inputs that move a lot are listed. It refuses exports that
    are not int8."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "int8_perturbation.py"
    spec = importlib.util.spec_from_file_location("int8_perturbation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "perturbation.json"
    argv = ["--model", tiny_llama_dir, "--export", str(tiny_exports["int8"]), "--sentences", "16", "--draws", "2", "--eps", "0.05"]
    assert module.main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    engines = [r["engine"] for r in result["rows"]]
    assert engines == ["graph (ONNX Runtime)", "simulation", "simulation, perturbed draw 1", "simulation, perturbed draw 2"]
    graph, simulated, draw1 = (result["rows"][i] for i in range(3))
    report = json.loads((tiny_exports["int8"] / "export_report.json").read_text())["quantization"]
    assert result["export"]["int8_layers"] == len(report["int8_layers"]) >= 1
    for kind in ("plain", "instructions"):
        assert simulated[kind]["min_cos"] < 0.99999  # int8 changes something
        assert abs(graph[kind]["mean_cos"] - simulated[kind]["mean_cos"]) < 0.05 * (1 - simulated[kind]["mean_cos"])
        assert draw1[kind]["mean_cos"] != simulated[kind]["mean_cos"]
    assert set(result["knife_edge_inputs"]) == {"plain", "instructions"}
    assert "| graph (ONNX Runtime) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs an int8 export"):
        module.main(["--model", tiny_llama_dir, "--export", str(tiny_exports["fp32"]), "--output", str(tmp_path / "no.json")])
    with pytest.raises(SystemExit, match="not an export folder"):
        module.main(["--model", tiny_llama_dir, "--export", str(tmp_path), "--output", str(tmp_path / "no.json")])
