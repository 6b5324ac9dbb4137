"""OpenVINO as the runtime of an exported folder: the same graphs (fp32, int8 with its ONNX Runtime
contrib ops, int4) give the embeddings ONNX Runtime gives, through the same ``encode()``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MIXED_TEXTS

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from llm2vec_fast.export import OnnxEncoder, export_onnx  # noqa: E402
from llm2vec_fast.export.calibrate import cosine_rows  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402

TEXTS = MIXED_TEXTS
# OpenVINO vs ONNX Runtime on the same graph: fp32 differs by summation order only; int8 also by
# a per-token code one step away where a value sits within float error of a half step
MIN_COS = {"fp32": 0.99999, "int8": 0.9995, "int4": 0.9999}


@pytest.fixture(scope="module")
def exports(tiny_llama_dir, tmp_path_factory):
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")
    root = tmp_path_factory.mktemp("openvino")
    return {p: export_onnx(encoder, root / p, precision=p, validate=False) for p in MIN_COS}


@pytest.mark.parametrize("precision", sorted(MIN_COS))
def test_openvino_matches_onnxruntime(exports, precision):
    ort_encoder = OnnxEncoder.from_pretrained(exports[precision], num_threads=1)
    ov_encoder = OnnxEncoder.from_pretrained(exports[precision], num_threads=1, runtime="openvino")
    assert ov_encoder.runtime == "openvino" and ort_encoder.runtime == "onnxruntime"
    assert ov_encoder.providers == ["OpenVINO:CPU"] and ov_encoder.device == torch.device("cpu")
    for batch_size in (1, 2, 8):  # different padded shapes through one compiled model
        ref = ort_encoder.encode(TEXTS, batch_size=batch_size, convert_to_numpy=True)
        got = ov_encoder.encode(TEXTS, batch_size=batch_size, convert_to_numpy=True)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert cosine_rows(got, ref).min() >= MIN_COS[precision]


def test_openvino_encode_api(exports):
    encoder = OnnxEncoder.from_pretrained(exports["fp32"], num_threads=1, runtime="openvino")
    single = encoder.encode("Hello world.")
    assert isinstance(single, torch.Tensor) and single.shape == (encoder.hidden_size,)
    normalized = encoder.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    # each call's output is its own array (the infer request reuses its buffers)
    a = encoder.encode(["first text"], convert_to_numpy=True)
    encoder.encode(["another, longer text than the first"], convert_to_numpy=True)
    np.testing.assert_array_equal(a, encoder.encode(["first text"], convert_to_numpy=True))


def test_bf16_inference_is_an_explicit_choice(exports):
    f32 = OnnxEncoder.from_pretrained(exports["fp32"], num_threads=1, runtime="openvino")
    assert f32.session.inference_precision == "f32"
    bf16 = OnnxEncoder.from_pretrained(exports["fp32"], num_threads=1, runtime="openvino", inference_precision="bf16")
    ref = f32.encode(TEXTS, convert_to_numpy=True)
    assert cosine_rows(bf16.encode(TEXTS, convert_to_numpy=True), ref).min() > 0.9


def test_bad_runtime_settings_are_rejected(exports):
    folder = exports["fp32"]
    with pytest.raises(ValueError, match="runtime must be one of"):
        OnnxEncoder.from_pretrained(folder, runtime="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        OnnxEncoder.from_pretrained(folder, runtime="openvino", providers="cuda")
    with pytest.raises(ValueError, match="openvino' only"):
        OnnxEncoder.from_pretrained(folder, inference_precision="bf16")
    with pytest.raises(ValueError, match="inference_precision must be one of"):
        OnnxEncoder.from_pretrained(folder, runtime="openvino", inference_precision="int8")


# ------------------------------------------------------------------------- int8-openvino export
def test_weight_only_int8_graph_is_the_rounded_weights():
    """``weight_only_int8_matmuls``: the chosen MatMul multiplies by the int8 weights times their
    column scales (ONNX Runtime without graph fusion computes exactly that in fp32), other MatMuls
    are left alone, and OpenVINO's run-time quantization of the input (per token and group of 32 or
    64 channels, as asked) stays close to it even with a token 1,000x larger than the others."""
    import onnx
    import onnxruntime as ort
    from llm2vec_fast.export.cpu_int8 import openvino_quantizes_activations
    from llm2vec_fast.export.openvino_runtime import OpenVINOSession
    from llm2vec_fast.export.quantize import quantize_columns, weight_only_int8_matmuls
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(128, 64)).astype(np.float32)
    v = rng.normal(size=(128, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/a/MatMul"), helper.make_node("MatMul", ["x", "v"], ["z"], name="/b/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, None, 128])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [None, None, k]) for n, k in (("y", 64), ("z", 32))],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")],
    )
    model = weight_only_int8_matmuls(helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)]), {"/a/MatMul"}, 127)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul", "MatMul"]
    assert {t.name for t in model.graph.initializer} == {"/a/MatMul/W_int8", "/a/MatMul/W_scale", "/a/MatMul/W_zero_point", "v"}
    x = rng.normal(size=(2, 7, 128)).astype(np.float32)
    x[0, 0] *= 1e3
    q, scale = quantize_columns(w, 127)
    rounded = q.astype(np.float32) * scale
    basic = ort.SessionOptions()  # no fusion: exactly DequantizeLinear then an fp32 MatMul
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    y, z = ort.InferenceSession(model.SerializeToString(), basic, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ rounded, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(z, x @ v, rtol=1e-5, atol=1e-3)
    path = Path(tempfile.mkdtemp()) / "m.onnx"
    onnx.save(model, path)
    by_group = {}
    int8_activations = openvino_quantizes_activations()
    for group in (32, 64):
        y_ov, z_ov = by_group[group] = OpenVINOSession(path, num_threads=1, activation_group_size=group).run(None, {"x": x})
        rel = np.linalg.norm(y_ov - x @ rounded, axis=-1) / np.linalg.norm(x @ rounded, axis=-1)
        if int8_activations:
            assert 1e-4 < rel.max() < 0.02  # int8 activations (not fp32); the huge token is no worse than the others
        else:  # x86 without VNNI: OpenVINO widens the int8 weights and multiplies in fp32
            assert rel.max() < 1e-5
        np.testing.assert_allclose(z_ov, x @ v, rtol=1e-4, atol=1e-2)
    if int8_activations:
        assert not np.array_equal(by_group[32][0], by_group[64][0])  # the group size reaches OpenVINO


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("group", [32, 64])
def test_simulated_activation_rounding_is_openvinos_rounding_in_the_graph(opset, group):
    """``simulate_activation_rounding``: each MatMul with int8 weights multiplies its input rounded
    per token and group of ``group`` channels (per token where its channels do not split into whole
    groups), the rounding the export's GPTQ calibrates on (``fake_int8_groups``); inputs shared by
    two such MatMuls are rounded once; fp32 MatMuls keep their input. Under OpenVINO on a CPU that
    keeps activations in fp32 it computes the same."""
    import onnx
    import onnxruntime as ort
    from llm2vec_fast.export.cpu_int8 import openvino_quantizes_activations
    from llm2vec_fast.export.int8_rounding import fake_int8_groups
    from llm2vec_fast.export.openvino_runtime import OpenVINOSession
    from llm2vec_fast.export.quantize import quantize_columns, simulate_activation_rounding, weight_only_int8_matmuls
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(128, 64)).astype(np.float32), rng.normal(size=(128, 16)).astype(np.float32)
    w3, v = rng.normal(size=(96, 32)).astype(np.float32), rng.normal(size=(128, 32)).astype(np.float32)  # 96: no whole 64-groups
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["y1"], name="/q/MatMul"),
            helper.make_node("MatMul", ["x", "w2"], ["y2"], name="/k/MatMul"),
            helper.make_node("MatMul", ["u", "w3"], ["y3"], name="/o/MatMul"),
            helper.make_node("MatMul", ["x", "v"], ["z"], name="/fp32/MatMul"),
        ],
        "g",
        [helper.make_tensor_value_info("x", f32, [None, None, 128]), helper.make_tensor_value_info("u", f32, [None, None, 96])],
        [helper.make_tensor_value_info(n, f32, [None, None, k]) for n, k in (("y1", 64), ("y2", 16), ("y3", 32), ("z", 32))],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (v, "v"))],
    )
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = simulate_activation_rounding(weight_only_int8_matmuls(model, {"/q/MatMul", "/k/MatMul", "/o/MatMul"}, 63), group)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Round") == 2  # x once for q and k, u once
    x, u = rng.normal(size=(2, 7, 128)).astype(np.float32), rng.normal(size=(2, 7, 96)).astype(np.float32)
    x[0, 0, :group] *= 1e3  # a huge group leaves the token's other groups as fine as before
    x[1, 3] = 0.0  # an all-zero token stays zero
    xr, ur = (fake_int8_groups(torch.from_numpy(a), group).numpy() for a in (x, u))
    assert not np.allclose(xr, x)
    rounded = {n: (lambda q, s: q.astype(np.float32) * s)(*quantize_columns(w, 63)) for n, w in (("w1", w1), ("w2", w2), ("w3", w3))}
    expected = [xr @ rounded["w1"], xr @ rounded["w2"], ur @ rounded["w3"], x @ v]
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    got = ort.InferenceSession(model.SerializeToString(), basic, providers=["CPUExecutionProvider"]).run(None, {"x": x, "u": u})
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=2e-3)
    if not openvino_quantizes_activations():
        path = Path(tempfile.mkdtemp()) / "m.onnx"
        onnx.save(model, path)
        for g, e in zip(OpenVINOSession(path, num_threads=1).run(None, {"x": x, "u": u}), expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=2e-3)


def test_activation_group_size_is_checked():
    from llm2vec_fast.export import Int8Options
    from llm2vec_fast.export.openvino_runtime import ACTIVATION_GROUP_SIZES, OpenVINOSession

    for bad in (0, 48, 256, 32.0, True):
        with pytest.raises(ValueError, match="activation group size must be one of"):
            Int8Options(activation_group_size=bad)
    with pytest.raises(ValueError, match="activation group size"):
        OpenVINOSession("unused.onnx", activation_group_size=100)
    from llm2vec_fast.cli import build_parser

    parser = build_parser()  # the CLI keeps its own copy of the sizes (openvino is optional there)
    for size in ACTIVATION_GROUP_SIZES:
        assert parser.parse_args(["export", "-o", "x", "--openvino-group-size", str(size)]).openvino_group_size == size
    for bad in ("48", "256"):
        with pytest.raises(SystemExit):
            parser.parse_args(["export", "-o", "x", "--openvino-group-size", bad])


@pytest.fixture(scope="module")
def int8_openvino_export(tiny_llama_dir, tmp_path_factory):
    encoder = LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32")
    folder = tmp_path_factory.mktemp("int8-openvino") / "export"
    return encoder, export_onnx(encoder, folder, precision="int8-openvino", validate=False)


def test_int8_openvino_export_runs_its_int8_layers_under_openvino(int8_openvino_export, caplog):
    """By default every decoder MatMul but the most sensitive layer's holds int8 weights, and
    OpenVINO groups 64 channels per activation scale; the folder opens under OpenVINO by default,
    close to torch; under ONNX Runtime it still runs (fp32 GEMMs on the int8 weights), with a warning."""
    import json
    import logging

    import onnx

    encoder, folder = int8_openvino_export
    graph = onnx.load(folder / "model.onnx")
    ops = [n.op_type for n in graph.graph.node]
    layers = encoder.model.config.num_hidden_layers
    assert ops.count("DequantizeLinear") == 7 * (layers - 1) and "MatMulIntegerToFloat" not in ops
    config = json.loads((folder / "llm2vec_config.json").read_text())
    assert config["onnx"]["precision"] == "int8-openvino" and config["onnx"]["int8_weight_bits"] == 8
    assert config["onnx"]["activation_group_size"] == 64
    ov = OnnxEncoder.from_pretrained(folder, num_threads=1)
    assert ov.runtime == "openvino" and ov.session.activation_group_size == 64
    ref = encoder.encode(TEXTS, convert_to_numpy=True)
    assert cosine_rows(ov.encode(TEXTS, convert_to_numpy=True), ref).min() > 0.99
    with caplog.at_level(logging.WARNING):
        ort_encoder = OnnxEncoder.from_pretrained(folder, num_threads=1, runtime="onnxruntime")
    assert ort_encoder.runtime == "onnxruntime" and "made for openvino" in caplog.text
    assert cosine_rows(ort_encoder.encode(TEXTS, convert_to_numpy=True), ref).min() > 0.99


def test_int8_openvino_export_is_validated_under_openvino(int8_openvino_export, tmp_path):
    """Validation runs the folder under OpenVINO against int8's bf16-relative bar, and the report
    says which decoder layers are int8 (all but the most sensitive) and how the activations are
    quantized."""
    import json

    from llm2vec_fast.export import ValidationConfig

    encoder, _ = int8_openvino_export
    folder = export_onnx(encoder, tmp_path / "validated", precision="int8-openvino", validate=ValidationConfig(stsb_pairs=0))
    report = json.loads((folder / "export_report.json").read_text())
    assert report["status"] == "ok" and report["providers"] == ["OpenVINO:CPU"]
    assert "bf16" in report and 0.95 <= report["thresholds"]["min_cos"] <= 0.98
    q = report["quantization"]
    most_sensitive = min(q["layer_sensitivity"], key=lambda s: (s["min_cos"], s["mean_cos"]))["layer"]
    assert q["decoder_layers"] == encoder.model.config.num_hidden_layers == 2 and q["fp32_layers_asked"] == 1
    assert q["fp32_layers"] == [most_sensitive] and q["int8_layers"] == [1 - most_sensitive] and "validation_fallback" not in q
    assert "group of 64" in q["activations"] and q["activation_group_size"] == 64 and q["weight_bits"] in (7, 8)


def test_int8_openvino_validation_fallback_keeps_the_most_sensitive_layer_in_fp32(int8_openvino_export, tmp_path, monkeypatch):
    """A graph that misses validation gets its most sensitive layer (a torch simulation of
    OpenVINO's per-group scheme) back in fp32, then validates; report and graph agree."""
    import json

    import onnx
    from llm2vec_fast.export import ValidationConfig
    from llm2vec_fast.export import exporter as exporter_module

    real = exporter_module.check_report

    def check(report):  # stands in for text the all-int8 graph is not faithful enough on
        return real(report) + (["too many int8 layers"] if report["quantization"]["int8_matmuls"] > 7 else [])

    monkeypatch.setattr(exporter_module, "check_report", check)
    encoder, _ = int8_openvino_export
    folder = export_onnx(
        encoder,
        tmp_path / "fallback",
        precision="int8-openvino",
        validate=ValidationConfig(stsb_pairs=0),
        int8=exporter_module.Int8Options(fp32_layers=0),  # every layer int8 at first
    )
    report = json.loads((folder / "export_report.json").read_text())
    q = report["quantization"]
    assert report["status"] == "ok" and [t["int8_layers"] for t in q["validation_fallback"]] == [2]
    sensitivity = q["layer_sensitivity"]
    most_sensitive = min(sensitivity, key=lambda s: (s["min_cos"], s["mean_cos"]))["layer"]
    assert len(sensitivity) == 2 and q["fp32_layers"] == [most_sensitive] and q["int8_layers"] == [1 - most_sensitive]
    weights = [n.input[0] for n in onnx.load(folder / "model.onnx").graph.node if n.op_type == "DequantizeLinear"]
    assert len(weights) == q["int8_matmuls"] == 7 and all(f"layers.{1 - most_sensitive}/" in w for w in weights)


def test_int8_openvino_validation_sees_int8_activations_on_a_cpu_without_vnni(int8_openvino_export, tmp_path, monkeypatch, caplog):
    """Where OpenVINO keeps activations in fp32 (x86 without VNNI) the export says so once, every
    validation try (fallback included) runs the graph with OpenVINO's activation rounding simulated
    in it (what a VNNI CPU computes, not the fp32 product), the report says so, and the saved graph
    leaves the rounding to OpenVINO; opening the folder there warns, without the 8-bit saturation
    warning (OpenVINO widens the weights). With VNNI none of this happens."""
    import json
    import logging
    import shutil
    import warnings

    import onnx
    from llm2vec_fast.export import OpenVINOFp32Warning, ValidationConfig, cpu_int8
    from llm2vec_fast.export import exporter as exporter_module

    encoder, _ = int8_openvino_export
    real_validate, real_check = exporter_module._validate, exporter_module.check_report
    rounds_seen = []

    def validate(reference, folder, precision, config):
        rounds_seen.append(sum(n.op_type == "Round" for n in onnx.load(folder / "model.onnx").graph.node))
        return real_validate(reference, folder, precision, config)

    monkeypatch.setattr(exporter_module, "_validate", validate)
    monkeypatch.setattr(
        exporter_module, "check_report", lambda r: real_check(r) + (["fallback"] if r["quantization"]["int8_matmuls"] > 7 else [])
    )
    monkeypatch.setattr(cpu_int8, "has_int8_dot", lambda flags=None: False)
    for vnni in (True, False):
        monkeypatch.setattr(cpu_int8, "openvino_quantizes_activations", lambda flags=None, machine=None, vnni=vnni: vnni)
        rounds_seen.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folder = export_onnx(
                encoder,
                tmp_path / f"vnni-{vnni}",
                precision="int8-openvino",
                validate=ValidationConfig(stsb_pairs=0),
                int8=exporter_module.Int8Options(fp32_layers=0),
            )
        assert sum(issubclass(w.category, OpenVINOFp32Warning) for w in caught) == (0 if vnni else 1)
        assert rounds_seen == ([0, 0] if vnni else [8, 4])  # per int8 layer: q/k/v's input, o's, gate/up's, down's
        q = json.loads((folder / "export_report.json").read_text())["quantization"]
        assert ("simulated" in q["validated_activation_rounding"]) == (not vnni) and len(q["validation_fallback"]) == 1
        nodes = onnx.load(folder / "model.onnx").graph.node
        assert not any(n.op_type == "Round" for n in nodes) and sum(n.op_type == "DequantizeLinear" for n in nodes) == 7
        eight_bit = tmp_path / f"8bit-{vnni}"
        shutil.copytree(folder, eight_bit)
        config = json.loads((eight_bit / "llm2vec_config.json").read_text())
        config["onnx"]["int8_weight_bits"] = 8
        (eight_bit / "llm2vec_config.json").write_text(json.dumps(config))
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            caplog.clear()
            OnnxEncoder.from_pretrained(eight_bit, num_threads=1)
        assert sum(issubclass(w.category, OpenVINOFp32Warning) for w in caught) == (0 if vnni else 1)
        assert "saturates" not in caplog.text


def test_fake_int8_groups_matches_per_group_rounding():
    from llm2vec_fast.export.int8_rounding import fake_int8_groups, fake_int8_rows

    x = torch.randn(3, 5, 64)
    x[0, 0, :32] *= 1000  # a huge group leaves the token's other group as fine as before
    grouped = fake_int8_groups(x, 32)
    torch.testing.assert_close(grouped[..., 32:], fake_int8_rows(x[..., 32:]))
    torch.testing.assert_close(grouped[..., :32], fake_int8_rows(x[..., :32]))
    torch.testing.assert_close(fake_int8_groups(x[..., :48], 32), fake_int8_rows(x[..., :48]))  # no whole groups: per token


def test_cli_eval_scores_an_int8_openvino_folder_under_openvino(int8_openvino_export, capsys):
    """``eval sts --onnx DIR`` on an int8-openvino folder scores it through OpenVINO (its runtime)."""
    import re

    from llm2vec_fast.cli import main
    from llm2vec_fast.stsb import stsb_spearman

    _, folder = int8_openvino_export
    expected = stsb_spearman(OnnxEncoder.from_pretrained(folder, num_threads=1, runtime="openvino"), "dev", limit=40)
    assert main(["eval", "sts", "--limit", "40", "--threads", "1", "--onnx", str(folder)]) == 0
    printed = float(re.search(r"Spearman x100: ([-\d.]+)", capsys.readouterr().out).group(1))
    assert abs(printed - expected) < 0.01


def test_int8_openvino_rounds_its_weights_with_gptq_on_openvinos_activation_rounding(int8_openvino_export, tmp_path, monkeypatch):
    """By default the graph stores exactly GPTQ's integers, calibrated with each Linear's input
    rounded as OpenVINO rounds it (per token and group of the export's size), and the report says
    so; ``rounding="nearest"`` stores the weights rounded to nearest."""
    import json

    import onnx
    from llm2vec_fast.export import Int8Options, ValidationConfig, gptq
    from llm2vec_fast.export.calibrate import decoder_layer_linears
    from llm2vec_fast.export.cpu_int8 import WEIGHT_LEVELS
    from llm2vec_fast.export.int8_rounding import fake_int8_groups
    from llm2vec_fast.export.quantize import quantize_columns
    from onnx import numpy_helper

    from llm2vec_fast.cli import build_parser

    real = gptq.gptq_decoder_weights
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        calls[-1]["result"] = real(*args, **kwargs)
        return calls[-1]["result"]

    monkeypatch.setattr(gptq, "gptq_decoder_weights", recording)
    encoder, _ = int8_openvino_export
    folder = export_onnx(
        encoder,
        tmp_path / "gptq",
        precision="int8-openvino",
        validate=ValidationConfig(stsb_pairs=0),
        int8=Int8Options(activation_group_size=32, fp32_layers=0),
    )
    q = json.loads((folder / "export_report.json").read_text())["quantization"]
    assert q["weight_rounding"] == "GPTQ (sequential, act-order)" and "rounding: GPTQ" in q["weights"]
    assert len(calls) == 1
    x = torch.randn(2, 3, 128)
    x[0, 0, :32] *= 100
    torch.testing.assert_close(calls[0]["activation_rounding"](x), fake_int8_groups(x, 32))
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(folder / "model.onnx").graph.initializer}
    weights = calls[0]["result"]
    assert len(weights) == 7 * encoder.model.config.num_hidden_layers
    for name, (integers, scale) in weights.items():
        np.testing.assert_array_equal(stored[f"{name}/W_int8"], integers)
        np.testing.assert_array_equal(stored[f"{name}/W_scale"], scale)
    assert OnnxEncoder.from_pretrained(folder, num_threads=1).encode(TEXTS, convert_to_numpy=True).shape[0] == len(TEXTS)

    calls.clear()
    nearest = export_onnx(
        encoder,
        tmp_path / "nearest",
        precision="int8-openvino",
        validate=False,
        int8=Int8Options(rounding="nearest", smoothing=0, fp32_layers=0),
    )
    assert not calls
    q = json.loads((nearest / "export_report.json").read_text())["quantization"]
    assert q["weight_rounding"] == "nearest"
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(nearest / "model.onnx").graph.initializer}
    levels = WEIGHT_LEVELS[8]  # int8-openvino: 8-bit on every CPU
    modules = {name: m for layer in decoder_layer_linears(encoder) for name, m in layer.items()}
    assert set(modules) == set(weights)
    for name, module in modules.items():  # no smoothing: the encoder's own weights, rounded to nearest
        np.testing.assert_array_equal(stored[f"{name}/W_int8"], quantize_columns(module.weight.detach().numpy().T, levels)[0])
    assert build_parser().parse_args(["export", "-o", "x"]).int8_rounding is None


def test_int8_openvino_group_size_is_recorded_and_used(int8_openvino_export, tmp_path):
    """A folder runs with the activation group its validation ran with: the chosen size is written
    to llm2vec_config.json and the report, and OnnxEncoder opens it with that size; a folder from
    before the size was recorded runs with 32 (what it was validated with)."""
    import json
    import shutil

    from llm2vec_fast.export import Int8Options, ValidationConfig

    encoder, default_folder = int8_openvino_export
    folder = export_onnx(
        encoder,
        tmp_path / "g32",
        precision="int8-openvino",
        validate=ValidationConfig(stsb_pairs=0),
        int8=Int8Options(activation_group_size=32),
    )
    config = json.loads((folder / "llm2vec_config.json").read_text())
    report = json.loads((folder / "export_report.json").read_text())
    assert config["onnx"]["activation_group_size"] == 32 == report["quantization"]["activation_group_size"]
    assert "group of 32" in report["quantization"]["activations"] and report["status"] == "ok"
    g32 = OnnxEncoder.from_pretrained(folder, num_threads=1)
    assert g32.session.activation_group_size == 32
    g64 = OnnxEncoder.from_pretrained(default_folder, num_threads=1)
    assert g64.session.activation_group_size == 64
    assert not np.array_equal(g32.encode(TEXTS, convert_to_numpy=True), g64.encode(TEXTS, convert_to_numpy=True))
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    config = json.loads((legacy / "llm2vec_config.json").read_text())
    del config["onnx"]["activation_group_size"]
    (legacy / "llm2vec_config.json").write_text(json.dumps(config))
    assert OnnxEncoder.from_pretrained(legacy, num_threads=1).session.activation_group_size == 32
    with pytest.raises(ValueError, match="int8-openvino setting"):
        export_onnx(encoder, tmp_path / "int8", precision="int8", int8=Int8Options(activation_group_size=32))


def test_int8_openvino_fp32_layers_are_checked_and_default_to_one(int8_openvino_export, tmp_path):
    """``fp32_layers`` defaults to the one most sensitive layer (the validated test above), to none on
    a one-layer model (the only layer stays int8); asking for every layer, or for int8, is refused
    before any work."""
    import copy
    import json

    from llm2vec_fast.export import Int8Options
    from torch import nn

    from llm2vec_fast.bidirectional import decoder_of
    from llm2vec_fast.cli import build_parser

    encoder, _ = int8_openvino_export
    one_layer = copy.deepcopy(encoder)
    decoder = decoder_of(one_layer.model)
    decoder.layers = nn.ModuleList(list(decoder.layers)[:1])
    one_layer.model.config.num_hidden_layers = 1
    folder = export_onnx(one_layer, tmp_path / "one-layer", precision="int8-openvino", validate=False)
    q = json.loads((folder / "export_report.json").read_text())["quantization"]
    assert q["fp32_layers_asked"] == 0 and q["int8_layers"] == [0] and q["fp32_layers"] == [] and q["int8_matmuls"] == 7
    with pytest.raises(ValueError, match="leaves none of the 2 decoder layers"):
        export_onnx(encoder, tmp_path / "none", precision="int8-openvino", int8=Int8Options(fp32_layers=2))
    with pytest.raises(ValueError, match="int8-openvino setting"):
        export_onnx(encoder, tmp_path / "int8", precision="int8", int8=Int8Options(fp32_layers=1))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="fp32_layers must be"):
            Int8Options(fp32_layers=bad)
    assert not any((tmp_path / name).exists() for name in ("none", "int8"))
    assert build_parser().parse_args(["export", "-o", "x"]).int8_fp32_layers is None
    assert build_parser().parse_args(["export", "-o", "x", "--int8-fp32-layers", "3"]).int8_fp32_layers == 3


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_int8_openvino_export_of_other_families(family, smollm_tokenizer, tmp_path):
    """The default int8-openvino export (GPTQ on OpenVINO's rounding, group 64, the most sensitive
    layer in fp32, SmoothQuant where the family has it) works beyond Llama: it validates under
    OpenVINO and encodes close to torch."""
    import json

    from conftest import tiny_config
    from llm2vec_fast.export import ValidationConfig
    from transformers import AutoModel

    from llm2vec_fast.bidirectional import enable_bidirectional

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(family), attn_implementation="eager").eval()  # gemma2 has no sdpa
    encoder = LLM2Vec(enable_bidirectional(model), smollm_tokenizer, max_length=64).eval()
    folder = export_onnx(encoder, tmp_path / family, precision="int8-openvino", validate=ValidationConfig(stsb_pairs=0))
    report = json.loads((folder / "export_report.json").read_text())
    q = report["quantization"]
    assert report["status"] == "ok" and q["weight_rounding"].startswith("GPTQ") and q["activation_group_size"] == 64
    assert len(q["fp32_layers"]) >= 1 and len(q["int8_layers"]) + len(q["fp32_layers"]) == q["decoder_layers"]
    ref = encoder.encode(TEXTS, convert_to_numpy=True)
    assert cosine_rows(OnnxEncoder.from_pretrained(folder, num_threads=1).encode(TEXTS, convert_to_numpy=True), ref).min() > 0.99
