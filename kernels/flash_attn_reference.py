"""Pure-torch references for packed (varlen) bidirectional attention.

* :func:`flash_attn_varlen_reference` is the CPU runtime path of
  :func:`llm2vec_fast.kernels.flash_attn_varlen`: one ``scaled_dot_product_attention`` call per
  sequence (no T x T mask is ever built), key/value heads repeated for GQA; explicit scores per
  sequence when logits are soft-capped or attention dropout is on. Differentiable.
* :func:`attention_naive` spells the computation out (scores, softmax, weighted sum) and is what the
  tests compare against, in float64 (``upcast=True``) or in the input dtype (``upcast=False``, the
  "same computation done by torch in the same dtype" that sets the error budget).

Shapes follow flash-attention's varlen API: ``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]``,
``cu_seqlens`` int32 ``[B+1]``; sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` and attends
to all of its own rows (not causal).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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


def _capped_scores(qs: torch.Tensor, ks: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """``q k^T * scale``, then ``softcap * tanh(scores / softcap)`` when ``softcap > 0`` (the order of
    transformers' Gemma2 eager attention and FlashAttention's ``softcap``)."""
    scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def _dropped(probs: torch.Tensor, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """Attention dropout on the probabilities: zero the dropped ones, scale the kept by ``1/(1-p)``."""
    if dropout_p <= 0.0:
        return probs
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))


def _sequence_keep(dropout_mask, dropout_p, shape, start, end, device, generator=None) -> torch.Tensor | None:
    """The ``[Hq, L, L]`` keep-mask of one sequence: a slice of ``dropout_mask`` (``[Hq, T, >= L]``), or a
    fresh Bernoulli(1-p) draw from ``generator`` (torch's default generator if None)."""
    if dropout_p <= 0.0:
        return None
    if dropout_mask is not None:
        return dropout_mask[:, start:end, : end - start]
    return torch.rand(shape, device=device, generator=generator) >= dropout_p


def flash_attn_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    softcap: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bidirectional varlen attention, one call per sequence. Returns ``[T, Hq, D]``; differentiable.

    Plain attention is one ``scaled_dot_product_attention`` call per sequence. With ``softcap > 0``
    (logits ``softcap * tanh(q.k * scale / softcap)``) or ``dropout_p > 0`` the scores are spelled out
    (softmax in float32). Dropout uses ``dropout_mask`` when given -- bool ``[Hq, T, >= max_seqlen]``,
    ``mask[h, t, j]`` keeps the probability of query row ``t`` on key ``j`` of its own sequence, as
    returned by :func:`llm2vec_fast.kernels.flash_attn_dropout_mask` -- or else draws a fresh mask
    from ``dropout_generator`` (torch's default generator if None; one draw per sequence, in order, so
    a generator in the same state redraws the same masks). ``max_seqlen`` is accepted for signature
    parity and otherwise ignored.
    """
    del max_seqlen
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    softcap = float(softcap or 0.0)
    outs = []
    for start, end in _segments(cu_seqlens):
        qs = q[start:end].transpose(0, 1)
        ks = _heads_first(k[start:end], group)
        vs = _heads_first(v[start:end], group)
        if softcap > 0.0 or dropout_p > 0.0:
            probs = torch.softmax(_capped_scores(qs, ks, scale, softcap).float(), dim=-1)
            keep = _sequence_keep(dropout_mask, dropout_p, probs.shape, start, end, q.device, dropout_generator)
            o = torch.matmul(_dropped(probs, keep, dropout_p).to(vs.dtype), vs)
        else:
            o = F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), scale=scale)[0]
        outs.append(o.transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape) + 0 * (k.sum() + v.sum())  # keeps the graph for empty batches
    return torch.cat(outs, dim=0)


def _sum_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[Hq, L, D]`` -> ``[Hkv, L, D]``: the inverse of :func:`_heads_first`'s repetition, for gradients."""
    return x.unflatten(0, (-1, group)).sum(1) if group > 1 else x


def flash_attn_varlen_reference_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    softcap: float = 0.0,
    dropout_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`flash_attn_varlen_reference` for ``grad_out``, written out per sequence
    in float32 (the torch backend's backward; a custom op's implementation runs without autograd).

    With ``dropout_p > 0``, ``dropout_generator`` must be in the state the forward started from: the
    masks are drawn again, in the same order and shapes."""
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    softcap = float(softcap or 0.0)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    for start, end in _segments(cu_seqlens):
        qs = q[start:end].transpose(0, 1).float()
        ks = _heads_first(k[start:end], group).float()
        vs = _heads_first(v[start:end], group).float()
        dout = grad_out[start:end].transpose(0, 1).float()
        scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale
        capped = torch.tanh(scores / softcap) if softcap > 0.0 else None
        probs = torch.softmax(capped * softcap if softcap > 0.0 else scores, dim=-1)
        keep = None
        if softcap > 0.0 or dropout_p > 0.0:  # the forward draws a mask in this branch only
            keep = _sequence_keep(None, dropout_p, probs.shape, start, end, q.device, dropout_generator)
        dv_heads = torch.matmul(_dropped(probs, keep, dropout_p).transpose(-1, -2), dout)
        dprobs = _dropped(torch.matmul(dout, vs.transpose(-1, -2)), keep, dropout_p)
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))  # softmax backward
        if softcap > 0.0:
            dscores = dscores * (1.0 - capped * capped)
        dq[start:end] = (torch.matmul(dscores, ks) * scale).transpose(0, 1).to(q.dtype)
        dk[start:end] = _sum_groups(torch.matmul(dscores.transpose(-1, -2), qs) * scale, group).transpose(0, 1).to(k.dtype)
        dv[start:end] = _sum_groups(dv_heads, group).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


def attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    upcast: bool = True,
    *,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Explicit scores/softmax/sum per sequence; differentiable.

    ``upcast=True``: everything in float64, returns float64 (the ground truth of the tests).
    ``upcast=False``: matmuls in the input dtype (rounded like a low-precision GEMM), softmax in
    float32 and cast back, returns the input dtype -- flash-attention's ``attention_ref(upcast=False)``.
    ``softcap`` and ``dropout_p``/``dropout_mask`` as in :func:`flash_attn_varlen_reference`
    (``dropout_p > 0`` needs the mask here).
    """
    if dropout_p > 0.0 and dropout_mask is None:
        raise ValueError("attention_naive needs dropout_mask when dropout_p > 0")
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = torch.float64 if upcast else q.dtype
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    outs = []
    for start, end in _segments(cu_seqlens):
        qs = qc[start:end].transpose(0, 1)
        ks = _heads_first(kc[start:end], group)
        vs = _heads_first(vc[start:end], group)
        scores = _capped_scores(qs, ks, scale, float(softcap or 0.0))
        probs = torch.softmax(scores.to(torch.float64 if upcast else torch.float32), dim=-1)
        keep = _sequence_keep(dropout_mask, dropout_p, probs.shape, start, end, q.device)
        outs.append(torch.matmul(_dropped(probs, keep, dropout_p).to(dtype), vs).transpose(0, 1))
    if not outs:
        return qc.new_zeros(q.shape) + 0 * (kc.sum() + vc.sum())
    return torch.cat(outs, dim=0)
