"""Pure-torch references for packed (varlen) bidirectional attention.

* :func:`flash_attn_varlen_reference` is the CPU runtime path of
  :func:`llm2vec_fast.kernels.flash_attn_varlen`: one ``scaled_dot_product_attention`` call per
  sequence (no T x T mask is ever built), key/value heads repeated for GQA. Differentiable.
* :func:`attention_naive` spells the computation out (scores, softmax, weighted sum) and is what the
  tests compare against, in float64 (``upcast=True``) or in the input dtype (``upcast=False``, the
  "same computation done by torch in the same dtype" that sets the error budget).

Shapes follow flash-attention's varlen API: ``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]``,
``cu_seqlens`` int32 ``[B+1]``; sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` and attends
to all of its own rows (not causal).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F


def _segments(cu_seqlens: torch.Tensor) -> Iterator[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            yield start, end


def _heads_first(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[L, H, D]`` -> ``[H * group, L, D]``, each head repeated ``group`` times (GQA)."""
    x = x.transpose(0, 1)
    return x.repeat_interleave(group, dim=0) if group > 1 else x


def flash_attn_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional varlen attention with SDPA, one call per sequence. Returns ``[T, Hq, D]``.

    ``max_seqlen`` is accepted for signature parity with the Triton path and ignored.
    """
    del max_seqlen
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for start, end in _segments(cu_seqlens):
        qs = q[start:end].transpose(0, 1)
        ks = _heads_first(k[start:end], group)
        vs = _heads_first(v[start:end], group)
        o = F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), scale=scale)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape) + 0 * (k.sum() + v.sum())  # keeps the graph for empty batches
    return torch.cat(outs, dim=0)


def attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Explicit scores/softmax/sum per sequence; differentiable.

    ``upcast=True``: everything in float64, returns float64 (the ground truth of the tests).
    ``upcast=False``: matmuls in the input dtype (rounded like a low-precision GEMM), softmax in
    float32 and cast back, returns the input dtype -- flash-attention's ``attention_ref(upcast=False)``.
    """
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = torch.float64 if upcast else q.dtype
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    outs = []
    for start, end in _segments(cu_seqlens):
        qs = qc[start:end].transpose(0, 1)
        ks = _heads_first(kc[start:end], group)
        vs = _heads_first(vc[start:end], group)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale
        probs = torch.softmax(scores.to(torch.float64 if upcast else torch.float32), dim=-1).to(dtype)
        outs.append(torch.matmul(probs, vs).transpose(0, 1))
    if not outs:
        return qc.new_zeros(q.shape) + 0 * (kc.sum() + vc.sum())
    return torch.cat(outs, dim=0)
