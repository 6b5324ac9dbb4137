"""Shared machinery of the contrastive stages (SimCSE, supervised): the encoder with a new LoRA
adapter on top of merged earlier adapters, batch embedding (padded now; packed varlen on CUDA once
the packed forward exists), InfoNCE across ranks, and GradCache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from ..prompting import EncodingInput
from .config import ContrastiveConfig
from .losses import distributed_info_nce, matryoshka_loss
from .trainer import (
    Stage,
    add_lora,
    add_quantization_aware,
    autocast,
    base_model_name,
    enable_checkpointing,
    fuse_for_training,
    packed_forward,
    pick_layout,
    train_dtype,
)


def _get_rng(device: torch.device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gradcache_backward(
    embed: Callable[[Sequence[EncodingInput]], torch.Tensor],
    chunks: list[Sequence[EncodingInput]],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """GradCache (Gao et al. 2021): the loss over the embeddings of *all* chunks, with the memory of
    one chunk.

    1. embed every chunk without grad (recording the RNG state before each, so dropout replays);
    2. compute ``loss_fn`` on the cached embeddings and backpropagate to them only;
    3. re-forward each chunk with grad under its recorded RNG state and backpropagate the cached
       embedding gradients (``(rep * cached_grad).sum()``); gradients accumulate in the parameters.

    The parameter gradients equal those of one plain forward/backward over the whole batch
    (given the same dropout masks). ``no_sync`` (DDP) defers the gradient all-reduce to the last chunk.
    Returns the (detached) loss.
    """
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_get_rng(device))
            reps.append(embed(chunk))
    after = _get_rng(device)
    cached = torch.cat(reps).detach().requires_grad_()
    loss = loss_fn(cached)
    loss.backward()
    grads = cached.grad.split([r.shape[0] for r in reps])
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        _set_rng(state, device)
        last = i == len(chunks) - 1
        with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
            rep = embed(chunk)
            (rep * grad.to(rep.dtype)).sum().backward()
    _set_rng(after, device)
    return loss.detach()


class ContrastiveStage(Stage):
    """Subclasses provide ``load_data`` and ``groups(indices)``: lists of encoder inputs embedded
    together (e.g. queries, positives, negatives); the first group are the queries, the rest the
    documents (positives first)."""

    config: ContrastiveConfig

    def build(self) -> None:
        from ..encoder import LLM2Vec

        cfg = self.config
        self.encoder = LLM2Vec.from_pretrained(
            base_model_name(cfg),
            peft_model_name_or_path=list(cfg.peft) or None,
            merge_peft=True,
            pooling_mode=cfg.pooling_mode,
            max_length=cfg.max_length,
            doc_max_length=cfg.max_length,
            skip_instruction=True,
            dtype=train_dtype(self.device),
            device=self.device,
            attention_dropout=cfg.attention_dropout,
        )
        decoder = self.encoder.model
        for p in decoder.parameters():
            p.requires_grad_(False)
        self.fused_report = fuse_for_training(decoder, cfg)
        if cfg.gradient_checkpointing:
            enable_checkpointing(decoder)
        self.peft_model = add_lora(decoder, cfg).to(self.device)
        for p in self.peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.quantization_aware = add_quantization_aware(self.peft_model, cfg)
        self.encoder.model = self.peft_model
        # packed on CUDA also with attention dropout (SimCSE): the varlen kernel applies it itself
        self.layout = pick_layout(self.config.batch_layout, self.device)
        if cfg.matryoshka_dims and max(cfg.matryoshka_dims) > self.encoder.hidden_size:
            raise ValueError(f"matryoshka_dims {cfg.matryoshka_dims} exceed the model's hidden size {self.encoder.hidden_size}")

    # ----------------------------------------------------------------------- embedding
    def embed(self, items: Sequence[EncodingInput]) -> torch.Tensor:
        """Pooled embeddings ``[len(items), hidden]`` (fp32) of encoder inputs, differentiable.

        Padded layout: on a single process the inputs are sorted by length and run in micro-batches
        of ``micro_batch_size`` rows, so short sentences do not pay for the longest one's padding
        (same result as one padded forward). Under DDP one forward call per backward is kept."""
        if self.layout == "packed":
            return self._embed_packed(items)
        size = self.config.micro_batch_size
        if size and len(items) > size and self.net is self.peft_model:
            order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
            reps = torch.cat([self._embed_padded([items[i] for i in order[s : s + size]]) for s in range(0, len(order), size)])
            return reps[torch.argsort(torch.tensor(order, device=reps.device))]
        return self._embed_padded(items)

    def _embed_padded(self, items: Sequence[EncodingInput]) -> torch.Tensor:
        features = self.encoder.collate(items, device=self.device)
        with autocast(self.device):
            out = self.net(
                input_ids=features["input_ids"],
                attention_mask=features["attention_mask"],
                position_ids=features["position_ids"],
            )
            reps = self.encoder.pool(out.last_hidden_state, features["pool_mask"])
        return reps.float()

    def _embed_packed(self, items: Sequence[EncodingInput]) -> torch.Tensor:
        """Padding-free: one ``[1, T]`` row, varlen attention (Triton fwd + bwd on CUDA, attention
        dropout inside the kernel) and varlen pooling. Goes through
        ``self.net`` so DDP sees the forward."""
        features = self.encoder.collate_packed(items, device=self.device)
        hidden = packed_forward(self.net, self.peft_model, features, self.device)
        return self.encoder.pool_packed(hidden, features).float()

    def groups(self, indices: list[int]) -> list[list[EncodingInput]]:
        raise NotImplementedError

    def loss_on(self, reps: torch.Tensor, n_groups: int) -> torch.Tensor:
        """InfoNCE of the queries (first group) against the documents; with ``matryoshka_dims``,
        summed over those embedding prefixes (sentence-transformers' ``MatryoshkaLoss``)."""

        def info_nce_of(r: torch.Tensor) -> torch.Tensor:
            parts = r.chunk(n_groups)
            return distributed_info_nce(parts[0], list(parts[1:]), self.config.loss_scale)

        return matryoshka_loss(info_nce_of, reps, self.config.matryoshka_dims, self.config.matryoshka_weights)

    def step(self, indices: list[int]) -> tuple[torch.Tensor, int]:
        groups = self.groups(indices)
        items = [x for g in groups for x in g]
        n_tokens = sum(len(x.input_ids) for x in items)
        if self.config.gradcache:
            size = self.config.gradcache_chunk_size
            chunks = [g[i : i + size] for g in groups for i in range(0, len(g), size)]
            no_sync = getattr(self.net, "no_sync", None)
            loss = gradcache_backward(self.embed, chunks, lambda r: self.loss_on(r, len(groups)), self.device, no_sync)
        else:
            loss = self.loss_on(self.embed(items), len(groups))
            loss.backward()
        return loss, n_tokens

    def llm2vec_config(self) -> dict:
        return {
            "pooling_mode": self.config.pooling_mode,
            **self.inference_lengths(),  # not the training length: see Stage.inference_lengths
            "skip_instruction": True,
            "model_id": self.encoder.model_id,
        }
