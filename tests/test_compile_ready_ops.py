"""Compile-ready, sync-free, thread-safe packed ops (issue 10, section 3).

* The attention and pooling ops are ``torch.library`` custom ops with fake implementations and
  registered autograd (``torch.library.opcheck``), so ``torch.compile(fullgraph=True)`` over a real
  model's packed forward has no graph break and matches eager, on the CPU torch backend.
* The packed path never reads ``cu_seqlens`` (or anything else) on the host: the whole packed forward
  runs on the meta device, where any device-to-host read raises.
* The packed/padded choice and the kernel backend are per call / per context: threads encoding at once
  through one model object with different paths and backends get their single-threaded results.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from conftest import tiny_config
from llm2vec_fast.kernels import _dispatch, cu_seqlens_from_lengths, flash_attn_varlen, masked_pool_varlen
from tolerances import rounding_tolerance
from transformers import AutoModel

from llm2vec_fast.bidirectional import decoder_of, enable_bidirectional
from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.packing import pack
from llm2vec_fast.prompting import EncodingInput
from llm2vec_fast.varlen_attention import ATTN_IMPLEMENTATION, kernel_backend, packed_hidden_states, use_varlen_attention

INTERPRETER = _dispatch.triton_device() == "cpu"
KERNEL_BACKENDS = ["torch"] + (["triton"] if INTERPRETER else [])
TEXTS = ["a short one", "a somewhat longer sentence about kernels and threads", "x", "packed batches " * 4, "mid size text"]


def _tiny_model(layers: int = 2, vocab_size: int = 49152) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(
        "llama",
        vocab_size=vocab_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        hidden_size=64,
    )
    return enable_bidirectional(AutoModel.from_config(config).eval())


def _packed_batch(lengths=(5, 1, 9), num_pooled=2) -> dict:
    return pack([EncodingInput(list(range(3, 3 + n)), min(num_pooled, n)) for n in lengths])


def _packed_embeddings(model, features, mode="mean"):
    hidden = packed_hidden_states(model, model, features)
    return masked_pool_varlen(hidden, features["cu_seqlens"], features["pool_mask"], mode, max_seqlen=features["max_seqlen"])


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


def _qkv(lengths, hq=4, hkv=2, d=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    return [torch.randn(n, h, d, generator=gen, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv)]


# the Triton interpreter is slow: one case, without the repeated AOT-dispatch runs (the torch backend
# covers those; the fake implementation does not depend on the backend beyond the lse shape)
ATTENTION_CASES = [("torch", 0.0, 0.0), ("torch", 0.25, 0.0), ("torch", 0.0, 3.0)]
ATTENTION_CASES += [pytest.param("triton", 0.25, 3.0, id="triton")] if INTERPRETER else []
FAST_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("backend, dropout_p, softcap", ATTENTION_CASES)
def test_attention_ops_pass_opcheck(backend, dropout_p, softcap):
    """Schema, fake implementation (fake tensors, meta) and autograd registration of the attention ops."""
    utils = FAST_OPCHECKS if backend == "triton" else FAST_OPCHECKS + ("test_aot_dispatch_dynamic",)
    lengths = [1, 6, 4]
    q, k, v = _qkv(lengths)
    cu = cu_seqlens_from_lengths(lengths)
    philox = torch.tensor([2**33 + 5, 2**34], dtype=torch.int64) if dropout_p else None
    args = (q, k, v, cu, 6, 0.125, softcap, dropout_p, philox, backend)
    torch.library.opcheck(torch.ops.llm2vec_fast.flash_attn_varlen_fwd.default, args, test_utils=utils)
    out, lse = torch.ops.llm2vec_fast.flash_attn_varlen_fwd(*args)
    grad = torch.randn_like(out)
    bwd_args = (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, 6, 0.125, softcap, dropout_p, philox, backend)
    torch.library.opcheck(torch.ops.llm2vec_fast.flash_attn_varlen_bwd.default, bwd_args, test_utils=utils)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last", "first"])
def test_pooling_ops_pass_opcheck(backend, mode):
    lengths = [3, 0, 5]
    hidden = torch.randn(8, 16, requires_grad=True)
    cu = cu_seqlens_from_lengths(lengths)
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.uint8)
    args = (hidden, cu, mask, mode, 5, backend)
    torch.library.opcheck(torch.ops.llm2vec_fast.masked_pool_varlen_fwd.default, args)
    _, stats = torch.ops.llm2vec_fast.masked_pool_varlen_fwd(*args)
    bwd_args = (torch.randn(3, 16), cu, mask, stats, mode, 5, hidden.new_empty((8, 0)), backend)
    torch.library.opcheck(torch.ops.llm2vec_fast.masked_pool_varlen_bwd.default, bwd_args)


def test_torch_backend_gradients_through_the_op_match_the_reference_with_dropout():
    """The torch backend's backward (vjp of the reference inside the op) redraws the forward's masks:
    the op's gradients equal autograd through the reference with the same generator state."""
    from llm2vec_fast.kernels.flash_attn import _reference_dropout_generator
    from llm2vec_fast.kernels.flash_attn_reference import flash_attn_varlen_reference

    lengths = [1, 7, 12]
    q, k, v = _qkv(lengths)
    cu = cu_seqlens_from_lengths(lengths)
    philox = torch.tensor([2**33 + 1, 2**35], dtype=torch.int64)
    out, _ = torch.ops.llm2vec_fast.flash_attn_varlen_fwd(q, k, v, cu, 12, 0.2, 0.0, 0.4, philox, "torch")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    gen = _reference_dropout_generator(q.device, 0.4, philox)
    ref = flash_attn_varlen_reference(q, k, v, cu, 12, 0.2, 0.4, dropout_generator=gen)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for g, r in zip(got, torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, r, **rounding_tolerance(torch.float32, 32))  # sums over d = 32 or 12 keys
    plain = flash_attn_varlen_reference(q, k, v, cu, 12, 0.2)
    assert (out - plain).abs().max() > 1e-2  # dropout really was on


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last", "first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_pooling_gradient_matches_autograd_through_the_reference(mode, dtype):
    """The pooling op's torch backward (written out: pooling is linear in ``hidden``) equals autograd
    through the reference, with empty sequences, sequences without pooled tokens and length 1."""
    from llm2vec_fast.kernels import masked_pool_varlen_reference

    lengths = [4, 0, 1, 6, 3]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(sum(lengths), 24, generator=gen).to(dtype)
    mask = torch.rand(sum(lengths), generator=gen) > 0.4
    mask[4] = False  # the length-1 sequence pools nothing
    cu = cu_seqlens_from_lengths(lengths)
    h, h_ref = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out = masked_pool_varlen(h, cu, mask, mode, max_seqlen=6, backend="torch")
    ref = masked_pool_varlen_reference(h_ref, cu, mask, mode)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    (grad_ref,) = torch.autograd.grad(ref, h_ref, grad_out)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, grad_ref, **rounding_tolerance(dtype, 6))  # no sequence is longer than 6
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_packed_forward_has_no_graph_break_and_matches_eager():
    """A real (tiny, random) Llama through the library's packed path -- attention kwargs, the varlen
    op in every layer, the pooling op -- compiles as one graph (``fullgraph=True`` raises on any
    break) and gives eager's embeddings; a second batch of other lengths reuses it without breaks."""
    model = _tiny_model(layers=1, vocab_size=512)
    compiled = torch.compile(_packed_embeddings, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.inference_mode():
        for lengths, mode in [((5, 1, 9), "mean"), ((2, 11, 3, 4), "last")]:
            features = _packed_batch(lengths)
            torch.testing.assert_close(compiled(model, features, mode), _packed_embeddings(model, features, mode))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernels need a GPU")
def test_gpu_compiled_packed_forward_matches_eager():
    """On the card, with its torch: the Triton custom ops (attention in every layer, pooling) inside
    ``torch.compile(fullgraph=True)`` of a bf16 packed forward, forward and backward, against eager."""
    model = _tiny_model(layers=2, vocab_size=512).to("cuda", torch.bfloat16)
    compiled = torch.compile(_packed_embeddings, fullgraph=True, backend="aot_eager", dynamic=True)
    with kernel_backend("triton"):
        with torch.inference_mode():
            for lengths, mode in [((5, 1, 9), "mean"), ((2, 130, 3, 4), "last")]:
                features = pack([EncodingInput(list(range(3, 3 + n)), min(2, n)) for n in lengths], "cuda")
                torch.testing.assert_close(compiled(model, features, mode), _packed_embeddings(model, features, mode))
        features = pack([EncodingInput(list(range(3, 3 + n)), n) for n in (7, 33)], "cuda")
        params = [p for p in model.parameters() if p.dim() == 2][:4]
        eager = torch.autograd.grad(_packed_embeddings(model, features).float().square().sum(), params)
        graph = torch.compile(lambda m: _packed_embeddings(m, features).float().square().sum(), fullgraph=True, backend="aot_eager")
        for e, c in zip(eager, torch.autograd.grad(graph(model), params)):
            torch.testing.assert_close(c, e, atol=2e-2, rtol=2e-2)


def test_compiled_packed_training_step_matches_eager():
    """Forward and backward through the ops' registered autograd under compile (AOTAutograd traces the
    backward ops too); gradients equal eager's."""
    model = _tiny_model(layers=1, vocab_size=512)
    features = _packed_batch((4, 1, 7))

    def loss_of(m):
        return _packed_embeddings(m, features).square().sum()

    params = [p for p in model.parameters()]
    eager_grads = torch.autograd.grad(loss_of(model), params)
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    compiled_grads = torch.autograd.grad(compiled(model), params)
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


def test_compiled_dropout_is_reproducible_and_fresh_per_call():
    """Under compile the dropout state is drawn inside the graph from torch's generator: the same seed
    gives the same output, the next call a new mask (a baked-in constant would repeat it)."""
    lengths = [3, 10]
    q, k, v = (t.detach() for t in _qkv(lengths))
    cu = cu_seqlens_from_lengths(lengths)

    def attend(q, k, v):
        return flash_attn_varlen(q, k, v, cu, 10, dropout_p=0.3, backend="torch")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    first, second = compiled(q, k, v), compiled(q, k, v)
    torch.manual_seed(11)
    again = compiled(q, k, v)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, second)


# ---------------------------------------------------------------------------------------------
# sync-free: nothing is read on the host
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _host_reads_forbidden():
    """Make every way of reading a tensor's values on the host raise."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def forbidden(name):
        def raise_(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called (a device-to-host read) in the packed path")

        return raise_

    try:
        for n in names:
            setattr(torch.Tensor, n, forbidden(n))
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_packed_forward_reads_nothing_on_the_host(backend):
    """The whole packed forward (model integration, attention in every layer, pooling) on the meta
    device -- the CUDA-less stand-in for a GPU: it has no values, so a ``.item()``/``.tolist()``/
    ``.cpu()`` of ``cu_seqlens`` (or of anything else) raises, and the ops' fake implementations run
    where the kernels would. On a GPU this path issues its kernels without one synchronisation."""
    model = _tiny_model(vocab_size=512).to("meta")
    features = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _packed_batch((5, 1, 9)).items()}
    with torch.inference_mode(), kernel_backend(backend), _host_reads_forbidden():
        out = _packed_embeddings(model, features)
    assert out.shape == (3, 64) and out.device.type == "meta"


def test_host_read_guard_can_fail():
    """The guard above catches a host read of cu_seqlens (as the old per-call validation did)."""
    q, k, v = (t.detach().to("meta") for t in _qkv([2, 3]))
    cu = cu_seqlens_from_lengths([2, 3]).to("meta")
    with _host_reads_forbidden(), pytest.raises((AssertionError, NotImplementedError, RuntimeError)):
        flash_attn_varlen(q, k, v, cu, 3, validate=True)


def test_validate_flag(monkeypatch):
    """CPU offsets are checked by default (free); ``validate=False`` never reads them, ``True`` always
    does. Missing ``max_length_q`` in a packed model call is an error, not a host read."""
    from llm2vec_fast.kernels import flash_attn as flash_attn_module
    from llm2vec_fast.kernels import pooling as pooling_module

    q, k, v = (t.detach() for t in _qkv([2, 3]))
    bad = torch.tensor([0, 3, 2, 5], dtype=torch.int32)
    good = cu_seqlens_from_lengths([2, 3])
    calls = {
        "attention": lambda cu, **kw: flash_attn_varlen(q, k, v, cu, 5, **kw),
        "pooling": lambda cu, **kw: masked_pool_varlen(q[:, 0], cu, torch.ones(5, dtype=torch.bool), "mean", max_seqlen=5, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="non-decreasing"):
            call(bad)
        with pytest.raises(ValueError, match="non-decreasing"):
            call(bad, validate=True)
        module = flash_attn_module if name == "attention" else pooling_module
        checked = []
        monkeypatch.setattr(module, "check_cu_seqlens", lambda *a, **kw: checked.append(a) or [0, 2, 5])
        call(good, validate=False)
        assert not checked, f"{name}: validate=False read cu_seqlens"
        call(good, validate=True)
        assert len(checked) == 1
        monkeypatch.undo()
    model = _tiny_model(layers=1, vocab_size=512)
    use_varlen_attention(decoder_of(model))
    features = _packed_batch((2, 3))
    with pytest.raises(ValueError, match="max_length_q"):
        model(
            input_ids=features["input_ids"],
            position_ids=features["position_ids"],
            cu_seq_lens_q=features["cu_seqlens"],
            cu_seq_lens_k=features["cu_seqlens"],
        )


# ---------------------------------------------------------------------------------------------
# thread safety: packed and padded calls on one model object at once
# ---------------------------------------------------------------------------------------------


def test_padded_forward_inside_a_packed_forward_is_still_padded(smollm_tokenizer, monkeypatch):
    """Deterministic version of the race: a padded encode runs *while* a packed forward is inside its
    first attention layer, on the same model object. With a config switched around packed calls the
    inner call would run the varlen function without a padding mask and return other embeddings."""
    from llm2vec_fast import varlen_attention

    model = _tiny_model()
    padded = LLM2Vec(model, smollm_tokenizer, packed=False)
    packed = LLM2Vec(model, smollm_tokenizer, packed=True)
    expected_padded = padded.encode(TEXTS, batch_size=8)
    expected_packed = packed.encode(TEXTS)
    inner: list[torch.Tensor] = []
    real = varlen_attention.flash_attn_varlen

    def nested(*args, **kwargs):
        if not inner:
            inner.append(padded.encode(TEXTS, batch_size=8))
        return real(*args, **kwargs)

    monkeypatch.setattr(varlen_attention, "flash_attn_varlen", nested)
    got_packed = packed.encode(TEXTS)
    torch.testing.assert_close(inner[0], expected_padded, atol=0, rtol=0)
    torch.testing.assert_close(got_packed, expected_packed, atol=0, rtol=0)
    torch.testing.assert_close(expected_packed, expected_padded, atol=1e-4, rtol=1e-4)


def test_threads_encode_packed_and_padded_with_different_backends_on_one_model(smollm_tokenizer):
    """Three threads, one model object: packed with the torch backend, packed with the Triton kernels
    (interpreter on CPU; ``auto`` without it) and padded, all at once and repeatedly; each gets its
    single-threaded embeddings. The model's padded attention stays what the config chose."""
    model = _tiny_model()
    impl_before = decoder_of(model).config._attn_implementation
    padded = LLM2Vec(model, smollm_tokenizer, packed=False)
    packed = LLM2Vec(model, smollm_tokenizer, packed=True, max_tokens_per_batch=16)  # several batches
    jobs = {
        "packed-torch": (packed, "torch"),
        "packed-kernel": (packed, "triton" if INTERPRETER else "auto"),
        "padded": (padded, "auto"),
    }
    expected = {}
    for name, (enc, backend) in jobs.items():
        with kernel_backend(backend):
            expected[name] = enc.encode(TEXTS, batch_size=2)
    torch.testing.assert_close(expected["packed-torch"], expected["padded"], atol=1e-4, rtol=1e-4)

    barrier, results, errors = threading.Barrier(len(jobs)), {}, []

    def work(name, enc, backend):
        try:
            with kernel_backend(backend):
                barrier.wait()
                results[name] = [enc.encode(TEXTS, batch_size=2) for _ in range(3)]
        except Exception as e:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n, *job)) for n, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for name in jobs:
        for got in results[name]:
            torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=1e-5)
    decoder = decoder_of(model)
    assert decoder.config._attn_implementation == ATTN_IMPLEMENTATION
    assert decoder._llm2vec_padded_attention == impl_before


def test_eager_model_keeps_eager_for_padded_calls_after_packed_ones(smollm_tokenizer, monkeypatch):
    """Routing through ``llm2vec_varlen`` records the config's implementation: an ``eager`` model's
    padded calls still run the family's eager attention (with its additive bidirectional mask)."""
    import transformers.models.llama.modeling_llama as llama

    model = _tiny_model(layers=1)
    decoder_of(model).config._attn_implementation = "eager"
    padded = LLM2Vec(model, smollm_tokenizer, packed=False)
    before = padded.encode(TEXTS, batch_size=8)
    LLM2Vec(model, smollm_tokenizer, packed=True).encode(TEXTS)
    calls = []
    real = llama.eager_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llama, "eager_attention_forward", counting)
    torch.testing.assert_close(padded.encode(TEXTS, batch_size=8), before, atol=0, rtol=0)
    assert calls, "the padded call did not use eager attention"
