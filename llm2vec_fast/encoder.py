"""``LLM2Vec``: a decoder-only LLM used as a bidirectional text encoder.

Same contract as the official ``llm2vec`` 0.2.3 ``LLM2Vec`` (``from_pretrained``, ``encode``,
``save``, ``llm2vec_config.json``), with padding-free packed batches and Triton kernels
on CUDA, and a plain padded torch path on CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .bidirectional import enable_bidirectional as make_bidirectional
from .kernels.pooling_reference import masked_pool_reference as masked_pool
from .loading import apply_adapters, load_base_model, resolve_model_path
from .prompting import EncodingInput, normalize_inputs, prepare_inputs

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
_KERNEL_MODE = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "last", "last_token": "last", "bos_token": "first"}
_CONFIG_KEYS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
PROGRESS_BAR_MIN_BATCHES = 10


class LLM2Vec(nn.Module):
    """A decoder-only LLM turned into a text encoder.

    Args:
        model: the bare decoder (``AutoModel``), optionally wrapped by peft.
        tokenizer: its tokenizer.
        pooling_mode: ``mean``, ``weighted_mean``, ``eos_token``, ``last_token`` or ``bos_token``.
        max_length: tokens per input after instruction and wrapping; longer inputs are truncated.
        doc_max_length: the text part is trimmed to this many tokens by dropping words.
        skip_instruction: pool only the text tokens (instruction tokens are still attended to).
        model_id: original model name, selects the official chat wrapping.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pooling_mode: str = "mean",
        max_length: int = 512,
        doc_max_length: int = 400,
        skip_instruction: bool = True,
        model_id: str | None = None,
    ):
        super().__init__()
        if pooling_mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling_mode {pooling_mode!r}; expected one of {POOLING_MODES}")
        if max_length < 1 or doc_max_length < 1:
            raise ValueError("max_length and doc_max_length must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.max_length = int(max_length)
        self.doc_max_length = int(doc_max_length)
        self.skip_instruction = bool(skip_instruction)
        self.model_id = model_id
        self.config = model.config
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._warned_truncation = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        peft_model_name_or_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        merge_peft: bool = False,
        pooling_mode: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
        enable_bidirectional: bool = True,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        **hf_kwargs,
    ) -> "LLM2Vec":
        """Load an encoder.

        ``model_name_or_path``: ``None`` / ``"default"`` for the embedded SmolLM2-135M-Instruct, or a
        local checkpoint folder (an official "mntp" folder with a LoRA adapter and no weights works
        too). ``peft_model_name_or_path``: a LoRA adapter folder, or a list of folders applied in
        order (all but the last merged). Encoder settings left as ``None`` come from
        ``llm2vec_config.json`` (in the adapter folder if given, else the model folder), then from
        the defaults (mean, 512, 400, True). ``dtype=None`` picks bf16 on CUDA and fp32 on CPU.
        Extra keyword arguments go to ``transformers.AutoModel.from_pretrained``.
        """
        from transformers import AutoTokenizer

        if hf_kwargs.get("trust_remote_code"):
            logger.warning("trust_remote_code=True runs code from the checkpoint folder")
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        path, model_id = resolve_model_path(model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_base_model(path, dtype, hf_kwargs)
        adapters = _as_list(peft_model_name_or_path)
        if adapters:
            model = apply_adapters(model, adapters, merge_last=merge_peft)
        if enable_bidirectional:
            make_bidirectional(model)

        settings: dict = {}
        config_dir = os.fspath(adapters[-1]) if adapters else path
        config_file = os.path.join(config_dir, "llm2vec_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                stored = json.load(f)
            settings.update({k: v for k, v in stored.items() if k in _CONFIG_KEYS})
            model_id = stored.get("model_id", model_id)
        overrides = dict(pooling_mode=pooling_mode, max_length=max_length, doc_max_length=doc_max_length, skip_instruction=skip_instruction)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        encoder = cls(model, tokenizer, model_id=model_id, **settings)
        return encoder.to(device).eval()

    # ---------------------------------------------------------------- tokenising
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def tokenize(self, sentences) -> list[EncodingInput]:
        """Token ids and pooled-span length of each input, as the official library computes them."""
        pairs, _ = normalize_inputs(sentences)
        return self._prepare(pairs)

    def _prepare(self, pairs: list[tuple[str, str]]) -> list[EncodingInput]:
        items = prepare_inputs(
            self.tokenizer,
            pairs,
            max_length=self.max_length,
            doc_max_length=self.doc_max_length,
            skip_instruction=self.skip_instruction,
            model_id=self.model_id,
            append_eos=self.pooling_mode == "eos_token",
        )
        if not self._warned_truncation and any(x.truncated for x in items):
            self._warned_truncation = True
            logger.warning("Some inputs are longer than max_length=%d tokens and were truncated.", self.max_length)
        return items

    def collate(self, items: Sequence[EncodingInput], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Right-padded batch with per-sequence ``position_ids`` and a ``pool_mask`` of the tokens to pool."""
        batch, length = len(items), max(len(x.input_ids) for x in items)
        input_ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        pool_mask = torch.zeros((batch, length), dtype=torch.bool)
        for i, item in enumerate(items):
            n = len(item.input_ids)
            input_ids[i, :n] = torch.tensor(item.input_ids)
            attention_mask[i, :n] = 1
            pool_mask[i, n - item.num_pooled : n] = True
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        features = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, pool_mask=pool_mask)
        return {k: v.to(device or self.device) for k, v in features.items()}

    # ------------------------------------------------------------------ forward
    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings ``[B, hidden]`` of a batch from :meth:`collate` (differentiable)."""
        out = self.model(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            position_ids=features.get("position_ids"),
        )
        return self.pool(out.last_hidden_state, features["pool_mask"])

    def pool(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return masked_pool(hidden, pool_mask, _KERNEL_MODE[self.pooling_mode])

    # ------------------------------------------------------------------- encode
    @torch.inference_mode()
    def encode(
        self,
        sentences: str | Sequence[str] | Sequence[Sequence[str]],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        device: str | torch.device | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Embed texts or ``[instruction, text]`` pairs.

        Inputs are sorted by length for batching and returned in input order, as float32 on
        the CPU: a tensor by default (like the official library), a numpy array with
        ``convert_to_numpy=True`` (``convert_to_tensor=True`` wins if both are set). A single
        string gives a 1-D result. ``show_progress_bar=None`` shows a bar on long runs.
        """
        pairs, single = normalize_inputs(sentences)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if device is not None:
            self.to(device)
        self.eval()
        items = self._prepare(pairs)
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) > PROGRESS_BAR_MIN_BATCHES
        out = torch.empty(len(items), self.hidden_size, dtype=torch.float32)
        for idx in tqdm(batches, desc="Encoding", unit="batch", disable=not show_progress_bar):
            features = self.collate([items[i] for i in idx])
            out[idx] = self(features).float().cpu()
        if normalize_embeddings:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        if single:
            out = out[0]
        if convert_to_numpy and not convert_to_tensor:
            return out.numpy()
        return out

    # --------------------------------------------------------------------- save
    def save(self, output_path: str | os.PathLike, merge_before_save: bool = True) -> None:
        """Write the model (LoRA adapters merged into a copy), the tokenizer and ``llm2vec_config.json``."""
        os.makedirs(output_path, exist_ok=True)
        model = self.model
        if merge_before_save and hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(output_path, safe_serialization=True)
        self.tokenizer.save_pretrained(output_path)
        config = {k: getattr(self, k) for k in _CONFIG_KEYS}
        config["model_id"] = self.model_id
        with open(os.path.join(output_path, "llm2vec_config.json"), "w") as f:
            json.dump(config, f, indent=4)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)
