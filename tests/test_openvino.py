"""OpenVINO as the runtime of an exported folder: the same graphs (fp32, int8 with its ONNX Runtime
contrib ops, int4) give the embeddings ONNX Runtime gives, through the same ``encode()``."""

from __future__ import annotations

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
