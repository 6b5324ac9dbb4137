"""Masked next-token prediction (LLM2Vec step 2).

A bidirectional causal-LM (``AutoModelForCausalLM`` + :func:`enable_bidirectional`) with LoRA on
the decoder learns to predict masked tokens. As in the official code (which reuses the causal-LM
loss shift), the label of a masked token at position ``i`` is predicted from the output at
position ``i - 1``; a mask at position 0 is therefore never a target. The loss is computed only at
masked positions: the hidden states are gathered first, then the LM head is applied chunk by chunk
(:func:`linear_cross_entropy`), so the ``[tokens x vocab]`` logits never exist.

The LoRA adapter wraps the bare decoder (module names ``layers.0.self_attn.q_proj``), as the
official ``get_model_for_peft`` does, so it loads onto ``AutoModel`` /
``LLM2Vec.from_pretrained(base, peft_model_name_or_path=adapter)``.
"""

from __future__ import annotations

import logging

import torch

from ..bidirectional import decoder_of, enable_bidirectional
from ..tokenization import padding_tokenizer
from .config import MNTPConfig
from .data import BatchSchedule, read_text_lines
from .losses import linear_cross_entropy
from .trainer import (
    Stage,
    add_lora,
    add_quantization_aware,
    autocast,
    enable_checkpointing,
    fuse_for_training,
    packed_forward,
    pick_layout,
    resolve_base,
    train_dtype,
)

logger = logging.getLogger(__name__)

IGNORE = -100
BLANK_MASK_TOKEN = "_"  # the official mask token for tokenizers without one


def mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, else ``_`` (official ``mask_token_type="blank"``)."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    tid = tokenizer.convert_tokens_to_ids(BLANK_MASK_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no mask token and no {BLANK_MASK_TOKEN!r} token")
    return int(tid)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float = 0.2,
    full_masking: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each real, non-special token is selected with ``probability``; a selected
    token becomes the mask token (80 %), a random token (10 %) or stays (10 %); with
    ``full_masking`` every selected token becomes the mask token. Returns ``(inputs, labels)``,
    labels ``-100`` except at selected positions (unshifted: see :func:`mntp_targets`)."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype, device=input_ids.device))
    prob = torch.where(candidates, probability, 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = IGNORE
    if full_masking:
        ids[selected] = mask_id
        return ids, labels
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & selected
    ids[replaced] = mask_id
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & selected & ~replaced
    ids[randomised] = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)[randomised]
    return ids, labels


def mntp_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, targets)``: the output at ``positions`` ``[N, 2]`` (batch, i - 1) predicts the
    masked token ``targets[N]`` at (batch, i). Position 0 is never a target."""
    shifted = labels[:, 1:]
    where = shifted != IGNORE
    return where.nonzero(), shifted[where]


def mntp_loss(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Linear, chunk: int = 1024, softcap: float | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the masked positions, from the hidden states ``[B, L, D]`` (after
    the final norm); only the ``[N, D]`` gathered states meet the LM head. ``softcap``: the model's
    ``final_logit_softcapping`` (Gemma2), applied to the logits as in its LM head."""
    where = labels[:, 1:] != IGNORE
    x = hidden[:, :-1][where]
    return linear_cross_entropy(x, lm_head.weight, labels[:, 1:][where], lm_head.bias, chunk=chunk, softcap=softcap)


def final_logit_softcap(config) -> float | None:
    """The causal LM's ``final_logit_softcapping`` (Gemma2), or ``None``."""
    value = getattr(config, "final_logit_softcapping", None)
    return float(value) if value else None


def mntp_batch(
    tokenizer,
    texts: list[str],
    *,
    max_length: int,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float,
    full_masking: bool,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Tokenised, right-padded and masked MNTP batch ``{input_ids, attention_mask, labels}``.

    The tokenizer goes through :func:`padding_tokenizer` (a copy when it is not set up yet), so a
    left-padding tokenizer (Llama, Gemma in transformers 5) gives the same batch as a right-padding one.
    """
    if tokenizer.padding_side != "right" or tokenizer.truncation_side != "right" or tokenizer.pad_token_id is None:
        tokenizer = padding_tokenizer(tokenizer)
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    ids, labels = mask_tokens(
        enc["input_ids"],
        enc["attention_mask"],
        mask_id=mask_id,
        vocab_size=vocab_size,
        special_ids=special_ids,
        probability=probability,
        full_masking=full_masking,
        generator=generator,
    )
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}


def padded_mntp_loss(net, lm_head, batch: dict, chunk: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """MNTP loss of a right-padded batch (from :func:`mntp_batch`) through ``net`` (a bidirectional
    bare decoder, peft or DDP wrapped)."""
    hidden = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return mntp_loss(hidden, batch["labels"], lm_head, chunk, softcap)


def packed_mntp_loss(net, model, lm_head, batch: dict, device, chunk: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """The same loss on one padding-free row through the varlen attention: labels at each sequence's
    first position are dropped (never a target in the padded path either), so no sequence predicts
    its neighbour. ``model``: the bidirectional decoder inside ``net``."""
    from ..packing import pack
    from ..prompting import EncodingInput

    lengths = batch["attention_mask"].sum(1)
    rows = [batch["input_ids"][i, : int(n)].tolist() for i, n in enumerate(lengths)]
    features = pack([EncodingInput(r, 1) for r in rows], device)
    labels = torch.cat([batch["labels"][i, : int(n)] for i, n in enumerate(lengths)]).to(device)
    labels[features["position_ids"][0] == 0] = IGNORE
    hidden = packed_forward(net, model, features, device)
    with autocast(device):
        return mntp_loss(hidden[None], labels[None], lm_head, chunk, softcap)


class MNTPStage(Stage):
    name = "mntp"
    config: MNTPConfig

    def load_data(self) -> BatchSchedule:
        self.texts = read_text_lines(self.config.data_files())
        return BatchSchedule(len(self.texts), self.config.batch_size, self.config.seed)

    def build(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..loading import apply_adapters

        base = resolve_base(self.config)
        # right padding, right truncation, a pad token: the batch code slices rows as [i, :n]
        self.tokenizer = padding_tokenizer(AutoTokenizer.from_pretrained(base), copy_tokenizer=False)
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=train_dtype(self.device))
        self.softcap = final_logit_softcap(lm.config)
        self.max_length = self.config.max_length
        limit = getattr(lm.config, "max_position_embeddings", None)
        if limit and self.max_length > int(limit):
            logger.warning(
                "max_length=%d exceeds the model's max_position_embeddings=%d: texts are truncated to %d tokens",
                self.max_length,
                limit,
                limit,
            )
            self.max_length = int(limit)
        decoder = decoder_of(lm)
        if self.config.peft:
            merged = apply_adapters(decoder, list(self.config.peft), merge_last=True)
            _replace_decoder(lm, decoder, merged)
            decoder = merged
        for p in lm.parameters():
            p.requires_grad_(False)
        enable_bidirectional(lm)
        self.fused_report = fuse_for_training(decoder, self.config)
        if self.config.gradient_checkpointing:
            enable_checkpointing(decoder)
        self.lm = lm.to(self.device)
        self.lm_head = lm.get_output_embeddings()
        self.peft_model = add_lora(decoder, self.config).to(self.device)
        for p in self.peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.quantization_aware = add_quantization_aware(self.peft_model, self.config)
        self.layout = pick_layout(self.config.batch_layout, self.device)
        self.mask_id = mask_token_id(self.tokenizer)
        self.special_ids = sorted(set(self.tokenizer.all_special_ids))
        self.vocab_size = len(self.tokenizer)

    def batch(self, indices: list[int], step_seed: int) -> dict[str, torch.Tensor]:
        return mntp_batch(
            self.tokenizer,
            [self.texts[i] for i in indices],
            max_length=self.max_length,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            special_ids=self.special_ids,
            probability=self.config.mlm_probability,
            full_masking=self.config.full_masking,
            generator=torch.Generator().manual_seed(step_seed),
        )

    def step(self, indices: list[int]) -> tuple[torch.Tensor, int]:
        """Mean loss over every masked token of the batch. Padded layout on one process: length-sorted
        micro-batches of ``micro_batch_size`` rows, each weighted by its share of the masked tokens,
        with gradients accumulated (same loss and gradients as one padded forward)."""
        # masking draws from a generator seeded by the samples, so it does not depend on the step order
        seed = (self.config.seed * 1_000_003 + hash(tuple(indices))) % 2**63
        b = self.batch(indices, seed)
        n_targets = int((b["labels"][:, 1:] != IGNORE).sum())
        lengths = b["attention_mask"].sum(1)
        if self.layout == "packed":
            return self._packed_step(b, lengths), int(lengths.sum())
        size = self.config.micro_batch_size if self.net is self.peft_model else 0
        order = torch.argsort(lengths, stable=True)
        parts = order.split(size) if size else [torch.arange(len(indices))]
        total = torch.zeros((), device=self.device)
        for rows in parts:
            width = int(lengths[rows].max())
            mb = {k: v[rows, :width].to(self.device) for k, v in b.items()}
            n = int((mb["labels"][:, 1:] != IGNORE).sum())
            if n == 0 and n_targets > 0:
                continue
            with autocast(self.device):
                loss = padded_mntp_loss(self.net, self.lm_head, mb, self.config.loss_chunk_size, self.softcap)
                loss = loss * (n / max(n_targets, 1))
            loss.backward()
            total += loss.detach().float()
        return total, int(lengths.sum())

    def _packed_step(self, b: dict, lengths: torch.Tensor) -> torch.Tensor:
        loss = packed_mntp_loss(self.net, self.peft_model, self.lm_head, b, self.device, self.config.loss_chunk_size, self.softcap)
        loss.backward()
        return loss.detach().float()

    def llm2vec_config(self) -> dict:
        return {"pooling_mode": "mean", **self.inference_lengths(), "skip_instruction": True}


def _replace_decoder(lm, old, new) -> None:
    for name, module in lm.named_children():
        if module is old:
            setattr(lm, name, new)
            return
    raise RuntimeError("could not find the decoder inside the causal LM")
