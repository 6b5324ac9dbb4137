"""The transformers integration of the varlen kernel (``llm2vec_fast.varlen_attention``): the kwargs
attention modules send (Gemma2's ``softcap``, ``dropout``, ``scaling``) reach the kernel.

The ground truth is transformers' own Gemma2 eager attention over a padded batch with a
block-diagonal (bidirectional) mask, fed the same q/k/v the packed path sees.
"""

from __future__ import annotations

import pytest
import torch
from llm2vec_fast.kernels import _dispatch, cu_seqlens_from_lengths
from tolerances import accumulation_eps
from torch import nn

from llm2vec_fast.varlen_attention import kernel_backend, varlen_attention_forward

gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")

BACKENDS = ["torch"] + (["triton"] if _dispatch.triton_device() == "cpu" else [])


class _Attn(nn.Module):
    """The attributes transformers' eager attention reads from its module."""

    def __init__(self, hq, hkv, d):
        super().__init__()
        self.head_dim, self.num_key_value_groups = d, hq // hkv


def _packed_inputs(lengths, hq, hkv, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(1, hq, n, d, generator=gen) * 3  # large logits: capping bites
    k = torch.randn(1, hkv, n, d, generator=gen)
    v = torch.randn(1, hkv, n, d, generator=gen)
    return q, k, v, cu_seqlens_from_lengths(lengths)


def _eager_block_diagonal(module, q, k, v, cu, scaling, softcap):
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
    mask = torch.where(seq[:, None] == seq[None, :], 0.0, float("-inf"))[None, None]
    out, _ = gemma2.eager_attention_forward(module, q, k, v, mask, scaling=scaling, softcap=softcap)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [1.0, 5.0, None])
def test_gemma2_softcap_reaches_the_kernel(backend, softcap):
    lengths, hq, hkv, d, scaling = [1, 13, 30], 4, 2, 64, 0.2
    module = _Attn(hq, hkv, d)
    q, k, v, cu = _packed_inputs(lengths, hq, hkv, d)
    with kernel_backend(backend):
        got, _ = varlen_attention_forward(
            module,
            q,
            k,
            v,
            None,
            dropout=0.0,
            scaling=scaling,
            softcap=softcap,
            sliding_window=None,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=30,
            max_length_k=30,
        )
    want = _eager_block_diagonal(module, q, k, v, cu, scaling, softcap)
    # both sides sum in float32, each in its own order: twice the worst case of one
    torch.testing.assert_close(got, want, atol=2 * accumulation_eps(want, d, max(lengths)), rtol=0)
    if softcap is not None:  # the cap changes the result, so this test can fail
        assert (want - _eager_block_diagonal(module, q, k, v, cu, scaling, None)).abs().max() > 1e-2


def test_softcap_without_packing_uses_the_models_eager_attention():
    """No ``cu_seq_lens_q`` (an unpacked call): SDPA cannot cap, so the module's eager attention runs."""
    hq, hkv, d = 2, 1, 32
    module = gemma2.Gemma2Attention.__new__(gemma2.Gemma2Attention)
    nn.Module.__init__(module)
    module.head_dim, module.num_key_value_groups, module.training = d, hq, False
    q, k, v, _ = _packed_inputs([9], hq, hkv, d)
    got, _ = varlen_attention_forward(module, q, k, v, None, scaling=0.3, softcap=1.0)
    want, _ = gemma2.eager_attention_forward(module, q, k, v, None, scaling=0.3, softcap=1.0)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# SimCSE with attention dropout: the packed layout (the CUDA default) vs the padded one
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_head32_dir(tmp_path_factory, smollm_tokenizer):
    from conftest import tiny_config
    from transformers import AutoModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-hd32-dropout")
    AutoModel.from_config(tiny_config("llama", num_attention_heads=2, num_key_value_heads=1, head_dim=32)).save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    return str(path)


def _simcse_stage(model_dir, tmp_path, layout):
    from llm2vec_fast.train import STAGE_CLASSES, make_config

    data = tmp_path / "sentences.txt"
    data.write_text("".join(f"sentence number {i} " + "word " * (i % 5) + "\n" for i in range(6)))
    config = make_config(
        "simcse",
        dict(
            model=model_dir,
            data=str(data),
            output_dir=str(tmp_path / layout),
            batch_size=6,
            max_length=24,
            attention_dropout=0.3,
            lora_dropout=0.0,
            device="cpu",
            batch_layout=layout,
            progress=False,
        ),
    )
    stage = STAGE_CLASSES["simcse"](config, torch.device("cpu"))
    schedule = stage.load_data()
    torch.manual_seed(0)
    stage.build()
    stage.wrap_ddp()
    assert stage.layout == layout
    return stage, stage.groups(schedule.batch(0))[0]


def test_simcse_packed_attention_dropout_matches_padded_statistics(tiny_head32_dir, tmp_path):
    """Same sentences, attention dropout 0.3: the packed path (varlen attention with in-kernel dropout,
    torch reference on CPU) and the padded path (transformers' attention with dropout) draw different
    masks, so compare distributions: equal without dropout, equal means and spreads with it."""
    stats = {}
    for layout in ("padded", "packed"):
        stage, items = _simcse_stage(tiny_head32_dir, tmp_path, layout)
        stage.peft_model.eval()
        with torch.no_grad():
            clean = stage.embed(items)
            stage.peft_model.train()
            draws = []
            for seed in range(48):
                torch.manual_seed(seed)
                draws.append(stage.embed(items))
        draws = torch.stack(draws).double()
        stats[layout] = (clean.double(), draws.mean(0), draws.std(0))
    (clean_a, mean_a, std_a), (clean_b, mean_b, std_b) = stats["padded"], stats["packed"]
    torch.testing.assert_close(clean_b, clean_a, rtol=1e-4, atol=1e-5)
    assert std_a.mean() > 1e-3 * clean_a.abs().mean()  # dropout is active on both paths
    z = (mean_a - mean_b).abs() / ((std_a**2 + std_b**2) / 48).sqrt().clamp_min(1e-9)
    assert z.max() < 6 and z.mean() < 1.3, (z.max(), z.mean())
    ratio = (std_b.mean() / std_a.mean()).item()
    assert 0.8 < ratio < 1.25, ratio


# ---------------------------------------------------------------------------------------------
# the backend switch is context-local
# ---------------------------------------------------------------------------------------------


def test_two_threads_encode_with_different_backends(smollm_tokenizer, monkeypatch):
    """``kernel_backend`` is a ContextVar: two threads encoding at once each keep their own backend,
    and both get the padded path's embeddings."""
    import copy
    import threading

    from conftest import tiny_config
    from transformers import AutoModel

    from llm2vec_fast import varlen_attention
    from llm2vec_fast.bidirectional import enable_bidirectional
    from llm2vec_fast.encoder import LLM2Vec

    texts = ["a short one", "a somewhat longer sentence about kernels and threads", "x", "packed batches " * 4]
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("llama", num_attention_heads=2, num_key_value_heads=1, head_dim=32, hidden_size=64))
    encoders = [LLM2Vec(enable_bidirectional(copy.deepcopy(model).eval()), smollm_tokenizer) for _ in range(2)]
    expected = encoders[0].encode(texts, batch_size=4)
    for enc in encoders:
        enc.packed, enc.max_tokens_per_batch = True, 16  # several packed batches per encode

    seen: dict[str, set] = {}
    real = varlen_attention.flash_attn_varlen

    def recording(*args, backend, **kwargs):
        seen.setdefault(threading.current_thread().name, set()).add(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(varlen_attention, "flash_attn_varlen", recording)
    barrier, results, errors = threading.Barrier(2), {}, []

    def work(name, enc, backend):
        try:
            with kernel_backend(backend):
                barrier.wait()
                results[name] = [enc.encode(texts) for _ in range(2)]
        except Exception as e:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(e)

    backends = {"t-torch": "torch", "t-kernel": "triton" if _dispatch.triton_device() == "cpu" else "auto"}
    threads = [threading.Thread(target=work, name=n, args=(n, enc, b)) for (n, b), enc in zip(backends.items(), encoders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for name, backend in backends.items():
        assert seen[name] == {backend}, (name, seen)
        for got in results[name]:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    from llm2vec_fast.varlen_attention import current_backend

    assert current_backend() == "auto"  # the main thread never saw either switch
