"""GPTQ: weights rounded to a quantization grid so that each ``nn.Linear``'s *output* on calibration
inputs, not each weight, stays as close to the original as the grid allows.

Round-to-nearest makes every weight's error as small as it can be, but the errors of one output add
up over the input dimension, and correlated inputs turn them into large output errors on some
tokens. GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") rounds one input column at a time and moves the rounding error onto the
columns not rounded yet, weighted by the inverse of the inputs' second moment ``H = X^T X`` (the
optimal brain surgeon update), so that ``W X`` changes as little as possible. The grid and the
per-output scales are the scheme's own (:class:`Grid`); only which grid value each weight gets
changes.

Two schemes use it: the int8 ONNX export (:mod:`llm2vec_fast.export.gptq`: integers on a symmetric
per-channel grid) and FP8 encoding (:mod:`llm2vec_fast.fp8`: ``float8_e4m3fn`` values with
per-channel scales).

:func:`sequential_gptq` runs it over a decoder **sequentially**: block ``i`` is calibrated on the
outputs of blocks ``0..i-1`` already quantized (GPTQ weights, and inputs rounded as the quantized
model rounds them), and within a block the projections that share an input (q/k/v, gate/up) are
calibrated after the earlier ones (o_proj after q/k/v, down_proj after gate/up) are quantized.
``H`` is taken over real tokens only, on the rounded activations the GEMM multiplies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_DAMP = 0.01  # fraction of the mean diagonal of H added to it (GPTQ's default)
BLOCK_COLUMNS = 128  # columns updated together (lazy batch updates); the result does not depend on it


@dataclass(frozen=True)
class Grid:
    """A per-output-channel quantization grid: ``scales(weight [out, in]) -> [out]`` (float32), and
    ``round(x)``: the nearest grid value of each element of ``x``, in units of its row's scale."""

    scales: Callable[[torch.Tensor], torch.Tensor]
    round: Callable[[torch.Tensor], torch.Tensor]


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    block_columns: int = BLOCK_COLUMNS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-rounded grid values of ``weight`` ``[out, in]``.

    Args:
        hessian: ``X^T X`` ``[in, in]`` of the calibration inputs (any positive factor).
        grid: the scheme's scales and rounding.
        damp: ``damp * mean(diag(H))`` is added to the diagonal (numerical stability).
        act_order: round the columns with the largest inputs first (``diag(H)`` descending).

    Returns:
        ``values`` float32 ``[out, in]`` (grid values) and ``scale`` float32 ``[out]`` with
        ``weight ~= values * scale[:, None]``, on ``weight``'s device.
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight [out, in] and hessian [in, in] expected, got {tuple(weight.shape)} and {tuple(hessian.shape)}")
    scale = grid.scales(weight).float()
    step = scale[:, None]
    # the factorisation in float64, the column updates in float32 (as GPTQ's reference code)
    w = weight.detach().float().clone()
    h = hessian.detach().to(w.device, torch.float64).clone()
    n = w.shape[1]
    dead = torch.diagonal(h) <= 0  # inputs never seen: plain rounding, no error moved through them
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype, device=h.device)
    # upper Cholesky factor of H^-1: row i holds the update of columns i.. after rounding column i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    values = torch.zeros_like(w)
    for start in range(0, n, block_columns):
        stop = min(start + block_columns, n)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hb = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i]
            qi = grid.round(column / step[:, 0])
            values[:, start + i] = qi
            err = (column - qi * step[:, 0]) / hb[i, i]
            block[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return values[:, torch.argsort(perm)], scale


class HessianAccumulator:
    """``X^T X`` (float64, on the inputs' device) of the rows of one Linear's inputs, real tokens
    only, optionally after a transform (the rounding the quantized GEMM applies to its input)."""

    def __init__(self, features: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.h = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0
        self.transform = transform
        self.token_mask: torch.Tensor | None = None  # [batch, seq] bool of the batch being run

    def add(self, x: torch.Tensor) -> None:
        if self.transform is not None:
            x = self.transform(x)
        if self.token_mask is not None and x.ndim == 3:
            x = x[self.token_mask]
        x = x.reshape(-1, x.shape[-1]).float()
        if self.h.device != x.device:
            self.h = self.h.to(x.device)
        self.h += (x.T @ x).double()  # float32 products per batch, float64 sum over batches
        self.rows += x.shape[0]


class _StopForward(Exception):
    pass


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def input_groups(block: nn.Module, linears: dict[str, nn.Linear], run: Callable[[], None]) -> list[list[str]]:
    """``linears`` of ``block`` grouped by the tensor they read (q/k/v, o, gate/up, down), in the
    order the block runs them (one call of ``run``)."""
    seen: list[tuple[torch.Tensor, str]] = []  # the inputs stay referenced, so no two share an id()
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((args[0], name))) for name, m in linears.items()]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[int, list[str]] = {}
    for tensor, name in seen:
        if name not in groups.setdefault(id(tensor), []):
            groups[id(tensor)].append(name)
    return list(groups.values())


@torch.no_grad()
def sequential_gptq(
    encoder,
    inputs: Sequence,
    layers: Sequence[dict[str, nn.Linear]],
    grid: Grid,
    activation_rounding: Callable[[torch.Tensor], torch.Tensor],
    store: Callable[[torch.Tensor, torch.Tensor], object],
    act_order: bool = True,
    damp: float = DEFAULT_DAMP,
    batch_size: int = 32,
    sequential: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """GPTQ-rounded weights of the decoder ``nn.Linear`` modules ``layers`` (per decoder layer, name
    -> module) of ``encoder``, calibrated on ``inputs``: ``{name: store(values, scale)}`` with
    ``values`` ``[out, in]`` and ``scale`` ``[out]`` from :func:`gptq_round` (``store`` turns them
    into the scheme's format as they come, so the float32 values of all layers never coexist).

    ``activation_rounding`` is how the quantized GEMM rounds each Linear's input; ``sequential=False``
    calibrates every Linear on the unquantized model's inputs, in one pass. The encoder is unchanged
    afterwards."""
    from .bidirectional import decoder_of

    blocks = list(decoder_of(encoder.model).layers)
    if len(layers) != len(blocks):
        raise ValueError(f"layers has {len(layers)} entries, the decoder {len(blocks)} layers")
    items = encoder.tokenize(list(inputs))
    device = next(encoder.model.parameters()).device
    # 1. one pass up to the last block: block 0's input and every block's other arguments
    batches: list[dict] = []
    current: dict = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            if index == 0:
                current["hidden"] = args[0] if args else kwargs["hidden_states"]
            rest = dict(kwargs)
            rest.pop("hidden_states", None)
            current.setdefault("calls", []).append((tuple(args[1:]), rest))
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    hooks = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for idx in encoder._batches(items, batch_size):
            batch = encoder.padded_batch([items[i] for i in idx])
            tensors = {k: torch.from_numpy(batch[k]).to(device) for k in ("input_ids", "attention_mask", "position_ids")}
            current.clear()
            try:
                encoder.model(**tensors, use_cache=False)
            except _StopForward:
                pass
            batches.append({"hidden": current["hidden"], "calls": current["calls"], "mask": tensors["attention_mask"].bool()})
    finally:
        for hook in hooks:
            hook.remove()

    def run_block(i: int, accumulators: Sequence[HessianAccumulator] = (), first_only: bool = False) -> list[torch.Tensor]:
        """Block ``i`` over the batches: its outputs, or nothing for a pass that a hook cut short
        with :class:`_StopForward` once it had the input it needed."""
        outs = []
        for b in batches[:1] if first_only else batches:
            for acc in accumulators:
                acc.token_mask = b["mask"]
            args, kwargs = b["calls"][i]
            try:
                outs.append(_block_output(blocks[i](b["hidden"], *args, **kwargs)))
            except _StopForward:
                pass
        return outs

    def accumulate_and_stop(acc: HessianAccumulator):
        # the group's input is all a Hessian pass needs: the rest of the block (attention after
        # q/k/v, the MLP after o_proj, ...) is skipped, about half the forward work of calibration
        def hook(module, args):
            acc.add(args[0])
            raise _StopForward

        return hook

    # 2. block by block, group by group
    result: dict[str, object] = {}
    round_input = _input_rounding(activation_rounding)
    installed: list = []  # (module, original weight, hook) of what runs quantized while later blocks calibrate
    try:
        for i, block in enumerate(blocks):
            linears = layers[i]
            for group in input_groups(block, linears, lambda i=i: run_block(i, first_only=True)):
                acc = HessianAccumulator(linears[group[0]].in_features, transform=activation_rounding)
                hook = linears[group[0]].register_forward_pre_hook(accumulate_and_stop(acc))
                try:
                    run_block(i, [acc])
                finally:
                    hook.remove()
                # the rows of one output never mix in GPTQ: the projections of a group (one H)
                # are rounded as one stacked matrix, one factorisation and one column loop
                modules = [linears[name] for name in group]
                stacked = torch.cat([m.weight.data.float() for m in modules])
                values_all, scale_all = gptq_round(stacked, acc.h, grid, damp=damp, act_order=act_order)
                sizes = [m.out_features for m in modules]
                for name, module, values, scale in zip(group, modules, values_all.split(sizes), scale_all.split(sizes)):
                    if sequential:
                        simulated = (values * scale[:, None]).to(module.weight.device, module.weight.dtype)
                        installed.append((module, module.weight.data, module.register_forward_pre_hook(round_input)))
                        module.weight.data = simulated
                    result[name] = store(values, scale)
                del values_all, stacked
            for b, out in zip(batches, run_block(i)):
                b["hidden"] = out
            if progress and ((i + 1) % 10 == 0 or i + 1 == len(blocks)):
                progress(f"GPTQ rounding of {i + 1}/{len(blocks)} layers done")
    finally:
        for module, weight, hook in installed:
            hook.remove()
            module.weight.data = weight
    return result


def _input_rounding(rounding: Callable[[torch.Tensor], torch.Tensor]):
    """A forward pre-hook that rounds a Linear's input as the quantized GEMM does."""

    def hook(module, args):
        return (rounding(args[0]), *args[1:])

    return hook
