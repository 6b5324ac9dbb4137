"""Losses: InfoNCE over cosine similarities, and a chunked linear cross-entropy that never
materialises the full ``[tokens x vocab]`` logits; plus an all-gather that keeps gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, d: torch.Tensor, scale: float = 20.0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``scale * cos(q_i, d_j)`` over ``j`` with target ``labels[i]``
    (default ``i``): ``d`` holds the positives first (``d[i]`` for ``q[i]``), then any hard
    negatives; every other row of ``d`` is an in-batch negative (official ``HardNegativeNLLLoss``)."""
    scores = F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T * scale
    if labels is None:
        labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(scores, labels)


def matryoshka_loss(loss_fn, reps: torch.Tensor, dims: list[int] | None, weights: list[float] | None = None) -> torch.Tensor:
    """Matryoshka representation learning (Kusupati et al. 2022), as sentence-transformers'
    ``MatryoshkaLoss``: ``sum_k weights[k] * loss_fn(reps[:, :dims[k]])``, so every prefix of the
    embedding is trained to work on its own (``loss_fn`` normalises, so each prefix is scored by its
    own cosine). ``dims`` empty or ``None``: plain ``loss_fn(reps)``. Weights default to 1."""
    if not dims:
        return loss_fn(reps)
    weights = list(weights) if weights else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights has {len(weights)} entries for {len(dims)} matryoshka_dims")
    if max(dims) > reps.shape[-1]:
        raise ValueError(f"matryoshka_dims {list(dims)} exceed the embedding dimension {reps.shape[-1]}")
    return sum(w * loss_fn(reps[..., :d]) for d, w in zip(dims, weights))


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward all-reduces (sums) the gradient of the gathered tensor
    and returns this rank's slice, so every rank's loss reaches every rank's embeddings.
    Works on gloo and NCCL (no reduce-scatter / all-to-all needed)."""

    @staticmethod
    def forward(ctx, tensor, group):
        import torch.distributed as dist

        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``cat`` of ``tensor`` from every rank (equal shapes), differentiable; identity without
    an initialised process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def distributed_info_nce(q: torch.Tensor, d_parts: list[torch.Tensor], scale: float) -> torch.Tensor:
    """InfoNCE of this rank's queries against the documents of *all* ranks.

    ``d_parts`` are this rank's document blocks (positives, then optionally hard negatives),
    each ``[b, D]``. Each block is all-gathered with gradients, so the negatives span every rank.
    Returns the mean loss over this rank's queries: with equal per-rank batches, the average of
    this over ranks is the single-process loss on the gathered batch, and since the all-gather's
    backward sums every rank's contribution, DDP's gradient *averaging* then yields exactly the
    single-process gradient (no extra scaling needed).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return info_nce(q, torch.cat(d_parts, dim=0), scale)
    rank, b = dist.get_rank(), q.shape[0]
    docs = torch.cat([all_gather_with_grad(part) for part in d_parts], dim=0)
    labels = torch.arange(b, device=q.device) + rank * b
    return info_nce(q, docs, scale, labels)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of ``x @ w.T (+ b)`` computed ``chunk`` rows at a time; the gradients
    are computed in the forward pass chunk by chunk (as Liger-Kernel does), so peak memory is one
    ``[chunk, vocab]`` block instead of ``[rows, vocab]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, chunk, softcap):
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_x = torch.empty_like(x) if x.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk):
            xc, tc = x[start : start + chunk], target[start : start + chunk]
            logits = (xc @ weight.T).float()
            if bias is not None:
                logits = logits + bias.float()
            if softcap is not None:  # Gemma2's final_logit_softcapping: c * tanh(z / c)
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if grad_x is None and grad_w is None and grad_b is None:
                continue
            g = torch.softmax(logits, dim=-1)
            g[torch.arange(len(tc), device=x.device), tc] -= 1.0
            if softcap is not None:
                g *= 1.0 - capped.square()  # d(c * tanh(z / c)) / dz
            if grad_x is not None:
                grad_x[start : start + chunk] = (g.to(weight.dtype) @ weight).to(x.dtype)
            if grad_w is not None:
                grad_w += g.T @ xc.float()
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(
            grad_x if grad_x is not None else torch.empty(0),
            grad_w.to(weight.dtype) if grad_w is not None else torch.empty(0),
            grad_b.to(bias.dtype) if grad_b is not None else torch.empty(0),
        )
        ctx.has = (grad_x is not None, grad_w is not None, grad_b is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gx, gw, gb = ctx.saved_tensors
        hx, hw, hb = ctx.has
        return (gx * grad_out if hx else None, gw * grad_out if hw else None, gb * grad_out if hb else None, None, None, None)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T + bias`` against ``target`` (rows ``[N, D]``, ``N >= 1``)
    without materialising the ``[N, vocab]`` logits. ``softcap``: logits become
    ``softcap * tanh(logits / softcap)`` first (Gemma2's ``final_logit_softcapping``)."""
    if x.shape[0] == 0:
        return x.sum() * 0.0
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    return _LinearCrossEntropy.apply(x, weight, bias, target, int(chunk), None if softcap is None else float(softcap)) / x.shape[0]
