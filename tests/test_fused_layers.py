"""Fused decoder layers (``fused=True``): the RMSNorm / residual-add + RMSNorm kernel against float64,
fused models against unfused ones (bit for bit on the torch backend, within the float32 budget on the
Triton interpreter: our norm kernel, Liger-Kernel's RoPE and SwiGLU), and their composition with
LoRA, FP8, the encoder API and the CLI.

On CPU the kernels run under the Triton interpreter, which rounds bfloat16 wrongly (fp32 and fp16 it
gets right): bf16 runs only on a GPU (``test_gpu_*``, selected by the GPU suite).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import tiny_config
from llm2vec_fast.kernels import _dispatch, rms_norm
from llm2vec_fast.kernels.rms_norm_reference import rms_norm_reference
from tolerances import assert_fp8_rows_close, rounding_tolerance
from transformers import AutoModel

from llm2vec_fast import LLM2Vec, enable_bidirectional
from llm2vec_fast.fused_layers import FusedRMSNorm, UnsupportedFusionError, fuse_decoder, is_fused
from llm2vec_fast.packing import pack
from llm2vec_fast.prompting import EncodingInput
from llm2vec_fast.varlen_attention import kernel_backend, packed_hidden_states

DEVICE = _dispatch.triton_device() or "cpu"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
# head_dim 32: the smallest the packed attention kernel takes
SIZES = dict(vocab_size=512, hidden_size=128, intermediate_size=96, head_dim=32)


# ------------------------------------------------------------------------------- the norm kernel
def _exact_norm(x, weight, eps, residual, casting, offset):
    total = x.double() + (residual.double() if residual is not None else 0)
    if residual is not None:
        total = total.to(x.dtype).double()  # the residual stream is rounded to x's dtype first
    normed = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    return normed * ((offset + weight.double()) if casting == "gemma" else weight.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("d", [32, 80])
def test_rms_norm_kernel_within_2x_torch_error(dtype, casting, with_residual, d):
    """37 rows (not a multiple of the row tile), D = 80 (not a power of two): the kernel's error
    against float64 stays within 2x the torch reference's own."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(37, d, generator=g).to(DEVICE, dtype)
    residual = torch.randn(37, d, generator=g).to(DEVICE, dtype) if with_residual else None
    weight = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype)
    offset = 1.0 if casting == "gemma" else 0.0
    got = rms_norm(x, weight, 1e-6, residual=residual, casting=casting, offset=offset, backend="triton")
    ref = rms_norm(x, weight, 1e-6, residual=residual, casting=casting, offset=offset, backend="torch")
    if with_residual:
        (got, got_sum), (ref, ref_sum) = got, ref
        assert torch.equal(got_sum, ref_sum) and torch.equal(ref_sum, residual + x), "the residual stream is one rounded add"
    exact = _exact_norm(x, weight, 1e-6, residual, casting, offset)
    err, torch_err = (got.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    if dtype == torch.bfloat16 and casting == "llama":
        # both round to bf16 twice (normalised, then times the weight): one bf16 unit apart at most
        torch.testing.assert_close(got, ref, atol=0, rtol=2 * torch.finfo(dtype).eps)
    assert got.dtype == dtype and got.shape == x.shape
    assert err <= 2 * torch_err + 1e-7, f"error {err:.3g} vs torch's {torch_err:.3g}"


def test_rms_norm_gradients_match_reference():
    g = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 9, 64, generator=g).to(DEVICE), torch.randn(2, 9, 64, generator=g).to(DEVICE)
    weight = (torch.rand(64, generator=g) + 0.5).to(DEVICE)
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight)]
        y, total = rms_norm(leaves[0], leaves[2], 1e-5, residual=leaves[1], backend=backend)
        (y.pow(2).sum() + (total * torch.arange(64.0, device=DEVICE)).sum()).backward()
        grads.append([t.grad for t in leaves])
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight)]
    total = leaves[1] + leaves[0]
    (rms_norm_reference(total, leaves[2], 1e-5).pow(2).sum() + (total * torch.arange(64.0, device=DEVICE)).sum()).backward()
    for got, ref, plain in zip(*grads, [t.grad for t in leaves]):
        torch.testing.assert_close(got, ref, **rounding_tolerance(torch.float32, 64))
        torch.testing.assert_close(ref, plain, **rounding_tolerance(torch.float32, 64))


def test_rms_norm_rejects_bad_input():
    x, w = torch.randn(3, 16), torch.ones(16)
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="offset"):
        rms_norm(x, w, 1e-6, offset=1.0)
    with pytest.raises(ValueError, match="casting"):
        rms_norm(x, w, 1e-6, casting="t5")
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, 1e-6, residual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x, w.double(), 1e-6, backend="triton")
    assert rms_norm(x, w.double(), 1e-6).dtype == torch.float64  # auto: the reference promotes like the model
    for empty in (torch.tensor(1.0), torch.zeros(3, 0)):
        with pytest.raises(ValueError, match="non-empty last dimension"):
            rms_norm(empty, torch.ones(empty.shape[-1:]), 1e-6)


def test_rows_wider_than_the_kernel_take_the_reference_under_auto(monkeypatch):
    """A row wider than the row kernels hold (16384): the reference under "auto" (as on CPU, so a wide
    model still runs on a GPU) and a clear refusal under "triton"; for the norm, the norm + FP8 and the
    FP8 quantizers alike. The dispatch is emulated: "auto" is made to pick Triton as on CUDA tensors."""
    pytest.importorskip("triton")
    from llm2vec_fast.kernels import fp8_quantize_rows, rms_norm_fp8, silu_mul_fp8

    for name in ("rms_norm", "fp8_quant"):  # the modules (the package's rms_norm is the function)
        module = importlib.import_module(f"llm2vec_fast.kernels.{name}")
        monkeypatch.setattr(module, "resolve_backend", lambda backend, tensors: "torch" if backend == "torch" else "triton")
    wide, weight = torch.randn(2, 16385), torch.rand(16385) + 0.5
    reference = rms_norm_reference(wide, weight, 1e-6)
    assert torch.equal(rms_norm(wide, weight, 1e-6), reference)
    assert torch.equal(rms_norm_fp8(wide, weight, 1e-6).values.view(torch.uint8), fp8_quantize_rows(reference).values.view(torch.uint8))
    assert silu_mul_fp8(torch.randn(2, 2 * 16385)).shape == (2, 16385)
    for call in (lambda: rms_norm(wide, weight, 1e-6, backend="triton"), lambda: rms_norm_fp8(wide, weight, 1e-6, backend="triton")):
        with pytest.raises(ValueError, match="rows of up to 16384 columns, got 16385"):
            call()


# ------------------------------------------------------------------------------- fused models
def _tiny_pair(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(0)
    model = enable_bidirectional(AutoModel.from_config(tiny_config(family, **{**SIZES, **overrides})).eval())
    model = model.to(device, dtype)
    return model, copy.deepcopy(model)


def _packed_batch(device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    return pack([EncodingInput(torch.randint(3, 500, (n,), generator=g).tolist(), n) for n in (7, 1, 20, 13)], device)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_equals_unfused_on_torch_backend(family):
    """On CPU (auto backend = the torch references, the models' own arithmetic) and with stacked
    projections, the fused decoder gives the unfused decoder's bits."""
    model, fused = _tiny_pair(family, attention_bias=family == "qwen2")
    report = fuse_decoder(fused)
    n_norms = 4 * 2 + 1 if family == "qwen3" else 2 * 2 + 1
    assert report == {"kernels": True, "norms": n_norms, "qkv_fused": 2, "gate_up_fused": 2, "kept_separate": {}}
    assert is_fused(fused) and not is_fused(model)
    assert all(isinstance(m, FusedRMSNorm) for n, m in fused.named_modules() if n.endswith(("layernorm", "norm")))
    features = _packed_batch()
    with torch.no_grad():
        assert torch.equal(packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features))
        ids = features["input_ids"][:, :40].reshape(2, 20)  # the padded path too
        assert torch.equal(fused(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_fused_model_with_other_activations_keeps_the_bits(hidden_act):
    """A Llama-style MLP with another activation than SiLU: the stacked gate/up is split and the
    activation applied in torch, on a contiguous gate (exact GELU rounds a strided one differently)."""
    model, fused = _tiny_pair("llama", hidden_act=hidden_act)
    fuse_decoder(fused)
    features = _packed_batch()
    with torch.no_grad():
        assert torch.equal(packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features))


def test_fusion_sees_through_the_encoder(smollm_tokenizer):
    """``fuse_decoder`` and ``is_fused`` take an ``LLM2Vec`` encoder as they take its model."""
    model, _ = _tiny_pair("llama")
    encoder = LLM2Vec(model, smollm_tokenizer)
    assert not is_fused(encoder)
    assert fuse_decoder(encoder)["qkv_fused"] == 2
    assert is_fused(encoder) and is_fused(encoder.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_kernels_match_unfused_under_interpreter(family):
    """Packed, Triton backend (interpreter): our norm kernel, Liger RoPE and fused SwiGLU against the
    unfused model through the same attention kernel, within the float32 rounding budget."""
    model, fused = _tiny_pair(family, DEVICE)
    fuse_decoder(fused)
    features = _packed_batch(DEVICE)
    with torch.no_grad(), kernel_backend("triton"):
        got, ref = packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features)
    torch.testing.assert_close(got, ref, **rounding_tolerance(torch.float32, SIZES["hidden_size"] * 2))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels need a GPU (the interpreter rounds bf16 wrongly)")
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_bf16_fused_model_matches_unfused(family):
    """bf16 on the GPU (auto backend): fused vs unfused packed hidden states, token by token."""
    model, fused = _tiny_pair(family, "cuda", torch.bfloat16)
    fuse_decoder(fused)
    features = _packed_batch("cuda")
    with torch.no_grad():
        got, ref = packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features)
    cosine = torch.nn.functional.cosine_similarity(got.float(), ref.float(), dim=-1)
    assert cosine.min().item() > 0.999, cosine.min().item()


def test_projection_fusion_alone_is_exact_without_triton(monkeypatch):
    """Stacked QKV / gate-up GEMMs only (no kernels), Triton reported missing: bit-exact on CPU."""
    from llm2vec_fast.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    model, fused = _tiny_pair("llama")
    report = fuse_decoder(fused, kernels=False)
    assert report["qkv_fused"] == 2 and report["norms"] == 0
    assert not hasattr(fused.layers[0].self_attn, "q_proj") and hasattr(fused.layers[0].mlp, "gate_up_proj")
    features = _packed_batch()
    with torch.no_grad():
        assert torch.equal(packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features))


def test_triton_backend_without_triton_errors_clearly(monkeypatch):
    from llm2vec_fast.kernels import _dispatch

    model, fused = _tiny_pair("qwen3")
    fuse_decoder(fused)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    features = _packed_batch()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="needs the triton package"), kernel_backend("triton"):
            packed_hidden_states(fused, fused, features)
        assert torch.equal(packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features))


def test_unsupported_family_is_refused_and_left_unchanged():
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("gemma2", **SIZES))  # pre/post feed-forward norms: another layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedFusionError, match="llama, mistral, qwen2, qwen3, gemma"):
        fuse_decoder(model)
    assert model.state_dict().keys() == before.keys() and not is_fused(model)


def test_unmerged_lora_keeps_its_projections_separate():
    from peft import LoraConfig, get_peft_model

    model, _ = _tiny_pair("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a non-zero delta
    reference = copy.deepcopy(peft_model)
    report = fuse_decoder(peft_model)
    assert report["qkv_fused"] == 0 and report["gate_up_fused"] == 2
    assert report["kept_separate"] == {"Linear is not a plain nn.Linear": 2}  # peft's lora.Linear
    features = _packed_batch()
    with torch.no_grad():
        base = reference.get_base_model()
        got = packed_hidden_states(peft_model, peft_model.get_base_model(), features)
        assert torch.equal(got, packed_hidden_states(reference, base, features))


def test_fp8_simulated_on_stacked_projections_matches_separate():
    """FP8 after fusion: per-channel weight scales and per-token activation scales do not depend on
    the stacking, so the stacked FP8 GEMMs give the separate ones' values (fp32 sums in another order)."""
    from llm2vec_fast.fp8 import quantize_linears

    model, fused = _tiny_pair("qwen2")
    fuse_decoder(fused)
    for m in (model, fused):
        names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        assert len(quantize_linears(m, names, simulate=True)) == len(names)
    features = _packed_batch()
    with torch.no_grad():
        got, ref = packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features)
    torch.testing.assert_close(got, ref, **rounding_tolerance(torch.float32, SIZES["hidden_size"] * 2))


@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("rows", "d"), [(37, 80), (5, 576), (3, 4096)])
def test_rms_norm_fp8_kernel_matches_norm_then_quantize(casting, with_residual, rows, d):
    """The norm-and-quantize kernel against the two references one after the other: the residual
    stream bit for bit, the scales within the norm kernel's float32 rounding, and the e4m3 values
    equal but for rare neighbours (a normalised value a rounding away from a step's midpoint)."""
    from llm2vec_fast.kernels import FP8Rows, fp8_quantize_rows, rms_norm_fp8
    from llm2vec_fast.kernels._dispatch import poisoned_outputs

    g = torch.Generator().manual_seed(d + rows)
    x = (torch.randn(rows, d, generator=g) * 3).to(DEVICE)
    residual = torch.randn(rows, d, generator=g).to(DEVICE) if with_residual else None
    weight = (torch.rand(d, generator=g) + 0.5).to(DEVICE)
    offset = 1.0 if casting == "gemma" else 0.0
    with poisoned_outputs():
        got = rms_norm_fp8(x, weight, 1e-6, residual=residual, casting=casting, offset=offset, backend="triton")
    normed = rms_norm(x, weight, 1e-6, residual=residual, casting=casting, offset=offset, backend="torch")
    ref = rms_norm_fp8(x, weight, 1e-6, residual=residual, casting=casting, offset=offset, backend="torch")
    if with_residual:
        (got, got_sum), (ref, ref_sum), (normed, normed_sum) = got, ref, normed
        assert torch.equal(got_sum, normed_sum) and torch.equal(ref_sum, normed_sum)
    assert isinstance(got, FP8Rows) and got.shape == x.shape and got.scales.shape == (rows, 1)
    expected = fp8_quantize_rows(normed, backend="torch")  # the reference is the two steps
    assert torch.equal(ref.values.view(torch.uint8), expected.values.view(torch.uint8)) and torch.equal(ref.scales, expected.scales)
    assert_fp8_rows_close(got, ref, 0.99)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_fused_fp8_layers_take_their_rows_from_the_norm(family):
    """With every projection after a norm in FP8, the fused layer's norms quantize (one kernel) and
    the projections take FP8 rows, as down_proj takes SwiGLU's; on the torch backend that gives the
    unfused FP8 model's bits. A decoder layer kept in high precision keeps the plain norm."""
    from llm2vec_fast.kernels import FP8Rows

    from llm2vec_fast.fp8 import FP8Linear, quantize_linears

    model, fused = _tiny_pair(family)
    fuse_decoder(fused)
    for m in (model, fused):
        names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and not n.startswith("layers.1.")]
        quantize_linears(m, names, simulate=True)
    seen = []
    hooks = [
        mod.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, isinstance(args[0], FP8Rows))))
        for name, mod in fused.named_modules()
        if isinstance(mod, FP8Linear)
    ]
    features = _packed_batch()
    with torch.no_grad():
        got, ref = packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features)
    for h in hooks:
        h.remove()
    assert torch.equal(got, ref)
    pre_quantized = {name.rsplit(".", 1)[-1] for name, rows in seen if rows}
    # the norms quantize for qkv / gate_up, SwiGLU for down_proj (Gemma's GeGLU: down_proj quantizes itself)
    expected = {"qkv_proj", "gate_up_proj"} | ({"down_proj"} if family != "gemma" else set())
    assert pre_quantized == expected and all(not rows for name, rows in seen if name.endswith("o_proj"))
    assert not any(name.startswith("layers.1.") for name, _ in seen)  # layer 1 stayed in high precision
    with torch.no_grad(), kernel_backend("triton"):  # the kernels (interpreter) within float32 rounding of FP8
        kernels = packed_hidden_states(fused, fused, features)
    cosine = torch.nn.functional.cosine_similarity(kernels, ref, dim=-1)
    assert cosine.min().item() > 0.999


@pytest.mark.skipif(
    DEVICE != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gpu_fused_fp8_model_matches_unfused_fp8(family):
    """bf16 on the card, every projection a real FP8 GEMM: the fused model (norms quantize for the
    projections) against the unfused one, token by token."""
    from llm2vec_fast.fp8 import quantize_linears

    model, fused = _tiny_pair(family, "cuda", torch.bfloat16)
    fuse_decoder(fused)
    for m in (model, fused):
        quantize_linears(m, [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)], simulate=False)
    features = _packed_batch("cuda")
    with torch.no_grad():
        got, ref = packed_hidden_states(fused, fused, features), packed_hidden_states(model, model, features)
    cosine = torch.nn.functional.cosine_similarity(got.float(), ref.float(), dim=-1)
    assert cosine.min().item() > 0.995, cosine.min().item()


def test_encoder_fused_option(tmp_path, smollm_tokenizer):
    torch.manual_seed(0)
    path = tmp_path / "tiny-qwen3"
    AutoModel.from_config(tiny_config("qwen3", **{**SIZES, "vocab_size": 49152})).save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    texts = ["A man is playing a guitar.", "x", ["Retrieve similar text:", "A woman slices an onion."]]
    plain = LLM2Vec.from_pretrained(str(path), device="cpu", packed=True)
    fused = LLM2Vec.from_pretrained(str(path), device="cpu", packed=True, fused=True)
    assert plain.fused_report is None and fused.fused_report["qkv_fused"] == 2
    assert torch.equal(fused.encode(texts, convert_to_tensor=True), plain.encode(texts, convert_to_tensor=True))
    with pytest.raises(ValueError, match="fused projections"):
        fused.save(tmp_path / "out")
    # FP8 after fusing: the stacked projections are the quantized layers (4 per decoder layer, not 7)
    kwargs = dict(device="cpu", packed=True, quantization="fp8-simulated", high_precision_layers=[])
    fp8_fused = LLM2Vec.from_pretrained(str(path), fused=True, **kwargs)
    fp8_plain = LLM2Vec.from_pretrained(str(path), **kwargs)
    assert fp8_fused.quantization_report["fp8_linears"] == 2 * 4 and fp8_plain.quantization_report["fp8_linears"] == 2 * 7
    cosine = torch.nn.functional.cosine_similarity(
        fp8_fused.encode(texts, convert_to_tensor=True), fp8_plain.encode(texts, convert_to_tensor=True), dim=-1
    )
    assert cosine.min().item() > 0.99999


def test_cli_fused_flag():
    import argparse

    from llm2vec_fast.cli.common import add_model_options, encoder_kwargs

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert encoder_kwargs(parser.parse_args(["--fused"]))["fused"] is True
    assert encoder_kwargs(parser.parse_args([]))["fused"] is False


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(
    "x_dtype, weight_dtype, casting",
    [(torch.float32, torch.float32, "llama"), (torch.bfloat16, torch.float32, "llama"), (torch.bfloat16, torch.float32, "gemma")],
)
def test_rms_norm_op_passes_opcheck(with_residual, x_dtype, weight_dtype, casting):
    """Schema, fake implementation and autograd registration of ``llm2vec_fast::rms_norm_fwd``
    (what ``torch.compile`` relies on), on the torch backend; fp32 norm weights under bf16 activations
    promote "llama"'s output, and the fake output must say so (else compiled code reads it as bf16)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g).to(x_dtype).requires_grad_()
    residual = torch.randn(6, 32, generator=g).to(x_dtype).requires_grad_() if with_residual else None
    weight = (torch.rand(32, generator=g) + 0.5).to(weight_dtype).requires_grad_()
    args = (x, residual, weight, 1e-6, casting, 0.0, None, "torch")
    torch.library.opcheck(
        torch.ops.llm2vec_fast.rms_norm_fwd.default, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )
