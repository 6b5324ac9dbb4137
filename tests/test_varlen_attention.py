"""The transformers integration of the varlen kernel (``llm2vec_fast.varlen_attention``): the kwargs
attention modules send (Gemma2's ``softcap``, ``dropout``, ``scaling``) reach the kernel.

The ground truth is transformers' own Gemma2 eager attention over a padded batch with a
block-diagonal (bidirectional) mask, fed the same q/k/v the packed path sees.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm2vec_fast.kernels import _dispatch, cu_seqlens_from_lengths
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
            module, q, k, v, None, dropout=0.0, scaling=scaling, softcap=softcap, sliding_window=None,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=30, max_length_k=30,
        )
    want = _eager_block_diagonal(module, q, k, v, cu, scaling, softcap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
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
