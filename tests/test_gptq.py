"""GPTQ rounding of the int8 export's weights (``export/gptq.py``): against a column-by-column
reference, against round-to-nearest, and sequentially over a tiny random decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")

from llm2vec_fast.export.gptq import gptq_decoder_weights, gptq_quantize, symmetric_scales  # noqa: E402
from llm2vec_fast.export.quantize import quantize_columns  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402


def reference_gptq(w: torch.Tensor, h: torch.Tensor, levels: int, damp: float, order: list[int]) -> torch.Tensor:
    """The optimal-brain-surgeon loop GPTQ derives from, written out: round column ``j``, move its
    error onto the remaining columns with the explicit inverse Hessian, remove ``j`` from it."""
    w = w.double().clone()
    step = symmetric_scales(w, levels).double()
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in order:
        q[:, j] = torch.clamp(torch.round(w[:, j] / step), -levels, levels)
        err = (w[:, j] - q[:, j] * step) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]  # rows of removed columns are 0 in hinv
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q


def correlated_inputs(rows: int, features: int, seed: int = 0, rank: int = 16) -> torch.Tensor:
    """Activations as a decoder's: a few strong directions shared by all features, plus noise."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, features, generator=g, dtype=torch.float64)
    return low_rank + 0.3 * torch.randn(rows, features, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("levels", [63, 127])
def test_gptq_equals_the_reference_loop(act_order, levels):
    x = correlated_inputs(200, 24, rank=6)
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = x.T @ x
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else list(range(24))
    # block_columns=5: the lazy block updates give the same integers as the plain loop
    q, scale = gptq_quantize(w.float(), h, levels, damp=0.01, act_order=act_order, block_columns=5)
    expected = reference_gptq(w.float(), h, levels, 0.01, order)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    np.testing.assert_array_equal(q.numpy(), expected.numpy().astype(np.int8))


@pytest.mark.parametrize("levels", [63, 127])
def test_gptq_beats_round_to_nearest_on_the_same_grid(levels):
    x = correlated_inputs(512, 64, seed=2)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)).float()
    rtn_q, rtn_scale = quantize_columns(w.numpy().T, levels)
    for act_order in (False, True):
        q, scale = gptq_quantize(w, x.T @ x, levels, act_order=act_order)
        np.testing.assert_array_equal(scale.numpy(), rtn_scale)  # same grid: only the integers differ
        assert int(q.abs().max()) <= levels
        w_gptq = q.double() * scale.double()[:, None]
        w_rtn = torch.from_numpy(rtn_q.T.astype(np.float64) * rtn_scale.astype(np.float64)[:, None])
        err_gptq = torch.linalg.norm(x @ (w.double() - w_gptq).T)
        err_rtn = torch.linalg.norm(x @ (w.double() - w_rtn).T)
        assert err_gptq < 0.5 * err_rtn, (act_order, float(err_gptq / err_rtn))


def test_gptq_leaves_unseen_inputs_to_plain_rounding():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(50, 6)
    x[:, 2] = 0  # input 2 never active in calibration
    q, scale = gptq_quantize(w, x.T @ x, 63)
    rtn_q, _ = quantize_columns(w.numpy().T, 63)
    assert torch.isfinite(q.float()).all()
    np.testing.assert_array_equal(q[:, 2].numpy(), rtn_q.T[:, 2])


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(torch.zeros(3, 4), torch.eye(3), 63)
    with pytest.raises(ValueError, match="levels"):
        gptq_quantize(torch.zeros(3, 4), torch.eye(4), 128)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_llama_dir):
    return LLM2Vec.from_pretrained(tiny_llama_dir, device="cpu")


def test_projections_are_grouped_by_their_shared_input(tiny_encoder):
    """q/k/v read one tensor, o_proj another, gate/up a third, down_proj a fourth: GPTQ calibrates
    each group after the previous ones are int8."""
    from llm2vec_fast.export.calibrate import decoder_layer_linears

    from llm2vec_fast.bidirectional import decoder_of
    from llm2vec_fast.gptq import input_groups

    block = decoder_of(tiny_encoder.model).layers[0]
    linears = decoder_layer_linears(tiny_encoder)[0]
    batch = tiny_encoder.collate(tiny_encoder.tokenize(["A man plays guitar.", "Dogs run."]))
    with torch.no_grad():
        groups = input_groups(block, linears, lambda: tiny_encoder(batch))
    short = [[n.split("/")[-2] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_sequential_gptq_over_a_decoder(tiny_encoder):
    """Every decoder MatMul gets GPTQ integers on the export's grid; the encoder is unchanged;
    the simulated int8 encoder is closer to fp32 with them than with round-to-nearest."""
    from llm2vec_fast.export.calibrate import Int8Simulator, calibration_inputs, cosine_rows

    inputs = calibration_inputs(48)
    held_out = ["A cat sleeps on the sofa.", ["Find a paraphrase of the given sentence", "It rains in Paris."], "Dogs run."] * 4
    before = tiny_encoder.encode(held_out, convert_to_numpy=True)
    weights = gptq_decoder_weights(tiny_encoder, inputs, levels=63, batch_size=16)
    np.testing.assert_array_equal(tiny_encoder.encode(held_out, convert_to_numpy=True), before)
    rtn = Int8Simulator(tiny_encoder)
    assert set(weights) == set(rtn.modules)
    for name, (q, scale) in weights.items():
        w = rtn.modules[name].weight.detach().numpy().T
        assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q).max() <= 63
        np.testing.assert_array_equal(scale, quantize_columns(w)[1])
    changed = sum(int((q != quantize_columns(rtn.modules[n].weight.detach().numpy().T)[0]).sum()) for n, (q, _) in weights.items())
    assert changed > 0
    gptq = Int8Simulator(tiny_encoder, weights=weights)
    everything = set(rtn.modules)
    reference = rtn.embed(set(), inputs)
    cos_rtn = cosine_rows(rtn.embed(everything, inputs), reference)
    cos_gptq = cosine_rows(gptq.embed(everything, inputs), reference)
    assert 1 - cos_gptq.mean() < 0.8 * (1 - cos_rtn.mean())


def test_int8_levers_script_on_a_tiny_model(tiny_llama_dir, tmp_path, capsys):
    """benchmarks/int8_levers.py scores every lever on held-out text and renders its table."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "int8_levers.py"
    spec = importlib.util.spec_from_file_location("int8_levers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "levers.json"
    assert module.main(["--model", tiny_llama_dir, "--quick", "--texts", "16", "--calibration", "24", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    configs = [r["config"] for r in result["rows"]]
    assert configs[:2] == ["bf16 (torch)", "int8 activations (per token) only"]
    assert "8-bit weights, gptq, sequential: weights + activations" in configs
    assert "SmoothQuant 0.5: int8 activations (per token) only" in configs
    assert "SmoothQuant 0.5, 8-bit weights, gptq, one pass: weights + activations" in configs and len(configs) == 15
    for r in result["rows"]:
        for kind in ("plain", "instructions"):
            assert 0 < r[kind]["min_cos"] <= r[kind]["mean_cos"] <= 1 + 1e-6
    assert "| 7-bit weights, nearest: weights only |" in capsys.readouterr().out


def test_gptq_calibrates_on_the_activation_rounding_it_is_given(tiny_encoder):
    """``activation_rounding`` is how every Linear's input is rounded, both in its Hessian and in the
    already-int8 layers later ones are calibrated on: the default is the int8 export's per-token
    rounding, and OpenVINO's per-group rounding (int8-openvino) gives other integers."""
    from llm2vec_fast.export.calibrate import calibration_inputs
    from llm2vec_fast.export.int8_rounding import fake_int8_groups, fake_int8_rows

    inputs = calibration_inputs(24)
    default = gptq_decoder_weights(tiny_encoder, inputs, levels=127, batch_size=16)
    explicit = gptq_decoder_weights(tiny_encoder, inputs, levels=127, batch_size=16, activation_rounding=fake_int8_rows)
    for name, (q, scale) in default.items():
        np.testing.assert_array_equal(explicit[name][0], q)
        np.testing.assert_array_equal(explicit[name][1], scale)
    widths = []

    def grouped(x: torch.Tensor) -> torch.Tensor:
        widths.append(x.shape[-1])
        return fake_int8_groups(x, 16)

    by_group = gptq_decoder_weights(tiny_encoder, inputs, levels=127, batch_size=16, activation_rounding=grouped)
    layers = tiny_encoder.model.config.num_hidden_layers
    # one Hessian per shared input (4 per layer) and, while later layers calibrate, every int8 Linear's input
    assert len(widths) > 4 * layers
    assert {tiny_encoder.model.config.hidden_size, tiny_encoder.model.config.intermediate_size} == set(widths)
    assert sum(int((by_group[n][0] != q).sum()) for n, (q, _) in default.items()) > 0


def test_quant_simulator_uses_weights_rounded_elsewhere(tiny_encoder):
    """``QuantSimulator(rounded_weights=...)`` swaps in the given weight (GPTQ's) for its Linear and
    rounds the others with ``fake_weight``; the encoder's own weights come back afterwards."""
    from llm2vec_fast.export.calibrate import decoder_layer_linears

    from llm2vec_fast.layer_sensitivity import QuantSimulator

    layers = decoder_layer_linears(tiny_encoder)
    (given_name, given), (other_name, other) = list(layers[0].items())[:2]
    replacement = torch.full_like(given.weight, 0.01)
    simulator = QuantSimulator(tiny_encoder, lambda x: x, lambda w: w * 0.5, layers=layers, rounded_weights={given_name: replacement})
    before = given.weight.detach().clone(), other.weight.detach().clone()
    with simulator.applied({given_name, other_name}):
        torch.testing.assert_close(given.weight, replacement)
        torch.testing.assert_close(other.weight, before[1] * 0.5)
    torch.testing.assert_close(given.weight, before[0])
    torch.testing.assert_close(other.weight, before[1])
