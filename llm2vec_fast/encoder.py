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

import torch
from torch import nn

from .bidirectional import enable_bidirectional as make_bidirectional
from .bidirectional import is_bidirectional, is_supported_family
from .cuda_graphs import DEFAULT_MAX_GRAPHS, PackedCudaGraphs
from .default_model import default_adapter_paths, is_default_encoder
from .encoding import (
    CONFIG_KEYS,
    DEFAULT_DOC_MAX_LENGTH,
    DEFAULT_MAX_LENGTH,
    KERNEL_POOLING_MODE,
    EncodeMixin,
    check_encoder_settings,
)
from .fp8 import apply_fp8, check_fp8_device, check_quantization, check_rounding
from .fused_layers import fuse_decoder, has_fused_projections, keep_residual_in_fp32, wants_fp32_residual
from .kernels import masked_pool, masked_pool_varlen
from .loading import (
    apply_adapters,
    check_tokenizer_files,
    dtype_from_name,
    hub_kwargs,
    load_base_model,
    merge_lora,
    offline_hint,
    read_encoder_settings,
    resolve_device,
    resolve_model_path,
)
from .packing import DEFAULT_MAX_TOKENS_PER_BATCH, pack, token_budget_batches
from .prompting import EncodingInput
from .tokenization import padding_tokenizer
from .varlen_attention import current_backend, packed_hidden_states, padded_forward

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("llm2vec", "sentence-transformers")


class LLM2Vec(EncodeMixin, nn.Module):
    """A decoder-only LLM turned into a text encoder.

    Args:
        model: the bare decoder (``AutoModel``), optionally wrapped by peft.
        tokenizer: its tokenizer.
        pooling_mode: ``mean``, ``weighted_mean``, ``eos_token``, ``last_token`` or ``bos_token``.
        max_length: tokens per input after instruction and wrapping; longer inputs are truncated.
        doc_max_length: the text part is trimmed to this many tokens by dropping words.
        skip_instruction: pool only the text tokens (instruction tokens are still attended to).
        model_id: original model name, selects the official chat wrapping.
        packed: run padding-free packed batches through the varlen attention kernel
            (``None``: on CUDA when the model is bidirectional).
        max_tokens_per_batch: token budget of one packed batch (``batch_size`` is ignored then).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pooling_mode: str = "mean",
        max_length: int = DEFAULT_MAX_LENGTH,
        doc_max_length: int = DEFAULT_DOC_MAX_LENGTH,
        skip_instruction: bool = True,
        model_id: str | None = None,
        packed: bool | None = None,
        max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    ):
        super().__init__()
        check_encoder_settings(pooling_mode, max_length, doc_max_length)
        self.model = model
        self.config = model.config
        # our own right-padding copy with a pad token (EOS if missing): the caller's object never changes
        self.tokenizer = padding_tokenizer(tokenizer)
        self.pooling_mode = pooling_mode
        self.max_length = int(max_length)
        self.doc_max_length = int(doc_max_length)
        self.skip_instruction = bool(skip_instruction)
        self.model_id = model_id
        self.packed = packed
        self.max_tokens_per_batch = int(max_tokens_per_batch)
        # set by llm2vec_fast.fp8.apply_fp8: the scheme ("fp8", "fp8-simulated") and what it chose
        self.quantization: str | None = None
        self.quantization_report: dict | None = None
        # set by from_pretrained(fused=True): what llm2vec_fast.fused_layers.fuse_decoder changed
        self.fused_report: dict | None = None
        self.cuda_graphs: PackedCudaGraphs | None = None

    @property
    def max_length(self) -> int:
        """Tokens per input; never more than the model's ``max_position_embeddings`` (longer inputs are
        truncated with a warning instead of running past the position table)."""
        return self._max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        value, limit = int(value), getattr(self.config, "max_position_embeddings", None)
        if limit and value > int(limit):
            logger.warning(
                "max_length=%d exceeds the model's max_position_embeddings=%d: inputs are truncated to %d tokens",
                value,
                limit,
                limit,
            )
            value = int(limit)
        self._max_length = value

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
        packed: bool | None = None,
        max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
        quantization: str | None = None,
        high_precision_layers: Sequence[int] | str = "calibrate",
        fp8_rounding: str = "gptq",
        fused: bool = False,
        residual_in_fp32: bool | None = None,
        cuda_graphs: bool | Sequence[int] = False,
        **hf_kwargs,
    ) -> LLM2Vec:
        """Load an encoder.

        ``model_name_or_path``: ``None`` / ``"default"`` for the default encoder (the embedded
        SmolLM2-135M-Instruct with the shipped LLM2Vec adapters, merged), ``"default-base"`` for the
        untrained base model, or a local checkpoint folder (an official "mntp" folder with a LoRA
        adapter and no weights works too). ``peft_model_name_or_path``: a LoRA adapter folder, or a
        list of folders applied in order (all but the last merged); with the default name they go on
        the untrained base model (which is what ``llm2vec-fast train`` starts from), in place of the
        shipped adapters. Encoder settings left as ``None`` come from
        ``llm2vec_config.json`` (in the adapter folder if given, else the model folder), then from
        the defaults (mean, 512, 400, True). ``dtype=None`` picks bf16 on CUDA and fp32 on CPU.
        ``packed`` / ``max_tokens_per_batch``: see :class:`LLM2Vec`.
        ``quantization="fp8"``: the decoder's linear layers as FP8 W8A8 GEMMs (``torch._scaled_mm``,
        CUDA GPUs of compute capability 8.9+; adapters are merged first), except the decoder layers
        ``high_precision_layers`` (indices, or ``"calibrate"``: chosen at load by measuring each
        layer's effect on STS-B train embeddings); ``"fp8-simulated"``: the same GEMM numerics on any
        device, for fidelity measurements (see :mod:`llm2vec_fast.fp8`; the rest of the model runs in
        ``dtype``: ``torch.bfloat16`` reproduces a GPU). ``fp8_rounding``: the FP8
        weights rounded by GPTQ on STS-B train text (``"gptq"``, closer, a calibration pass at load)
        or to the nearest e4m3 value (``"nearest"``).
        ``fused=True``: fused decoder layers (Llama, Mistral, Qwen2, Qwen3, Gemma; see
        :mod:`llm2vec_fast.fused_layers`): fused residual-add + RMSNorm, Liger-Kernel RoPE and SwiGLU
        on CUDA (the torch reference, the same numbers as unfused, on CPU), and stacked QKV / gate-up
        GEMMs (adapters are merged first; with ``quantization`` the stacked GEMMs are the ones in FP8).
        Off by default until measured on a GPU.
        ``residual_in_fp32``: keep the residual stream in float32 under a 16-bit model (see
        :func:`llm2vec_fast.fused_layers.keep_residual_in_fp32`; the GEMMs stay 16-bit or FP8, the
        embeddings come out float32). ``None`` (default): on with ``quantization`` in a bf16/fp16 model of
        a family with fused layers, where it is what brings FP8's worst case within bf16's
        (``docs/encoding.md``), off otherwise (plain bf16 keeps the model's own arithmetic).
        ``cuda_graphs``: replay the packed forward from CUDA graphs captured per token-count bucket
        (``True``: powers of two; or a list of bucket sizes), see :meth:`use_cuda_graphs`.
        Extra keyword arguments go to ``transformers.AutoModel.from_pretrained``.
        """
        from transformers import AutoTokenizer

        if hf_kwargs.get("trust_remote_code"):
            logger.warning("trust_remote_code=True runs code from the checkpoint folder")
        check_quantization(quantization)
        check_rounding(fp8_rounding)
        if quantization == "fp8":  # before the weights load, and before the device check names CUDA alone
            check_fp8_device(device if device is not None else resolve_device(None))
        device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = dtype_from_name(dtype)
        path, model_id = resolve_model_path(model_name_or_path)
        check_tokenizer_files(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(hf_kwargs))
        except OSError as err:
            if os.path.isdir(path):
                raise
            raise OSError(
                f"{path!r} is no local folder (from {os.getcwd()}) and could not be loaded from the Hugging Face hub: {err}"
                + offline_hint(hf_kwargs)
            ) from err
        model = load_base_model(path, dtype, hf_kwargs)
        adapters = _as_list(peft_model_name_or_path)
        if not adapters and is_default_encoder(model_name_or_path):
            # the default encoder: the shipped adapters, merged (plain weights, no LoRA at inference)
            adapters = [os.fspath(p) for p in default_adapter_paths()]
            for adapter in adapters:
                model = merge_lora(model, adapter)
        elif adapters:
            # quantized weights and stacked projections cannot carry a LoRA delta: merged
            model = apply_adapters(model, adapters, merge_last=merge_peft or quantization is not None or fused)
        if enable_bidirectional:
            make_bidirectional(model)
        fused_report = fuse_decoder(model) if fused else None
        if wants_fp32_residual(residual_in_fp32, quantization, dtype, model):
            keep_residual_in_fp32(model)  # before FP8's calibration, which measures the model as it will run

        settings, stored_id = read_encoder_settings(adapters[-1] if adapters else path, hf_kwargs)
        model_id = stored_id or model_id
        overrides = dict(pooling_mode=pooling_mode, max_length=max_length, doc_max_length=doc_max_length, skip_instruction=skip_instruction)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        encoder = cls(model, tokenizer, model_id=model_id, packed=packed, max_tokens_per_batch=max_tokens_per_batch, **settings)
        encoder.fused_report = fused_report
        encoder = encoder.to(device).eval()
        if quantization is not None:
            # GPTQ and the layer calibration take a while on large models: their steps go to the log (CLI: -v)
            apply_fp8(encoder, quantization, high_precision_layers, rounding=fp8_rounding, progress=logger.info)
        if cuda_graphs is not False:
            encoder.use_cuda_graphs(None if cuda_graphs is True else cuda_graphs)
        return encoder

    # ------------------------------------------------------------------ batches
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def collate(self, items: Sequence[EncodingInput], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Right-padded tensor batch (see :meth:`padded_batch`) on ``device`` (default: the model's)."""
        return {k: torch.from_numpy(v).to(device or self.device) for k, v in self.padded_batch(items).items()}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings ``[B, hidden]`` of a batch from :meth:`collate` (differentiable)."""
        with padded_forward():  # a padded call nested in a packed one (a hook, another encoder) is padded
            out = self.model(
                input_ids=features["input_ids"],
                attention_mask=features["attention_mask"],
                position_ids=features.get("position_ids"),
            )
        return self.pool(out.last_hidden_state, features["pool_mask"])

    def pool(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return masked_pool(hidden, pool_mask, KERNEL_POOLING_MODE[self.pooling_mode])

    # ------------------------------------------------------------ packed path
    @property
    def use_packed(self) -> bool:
        if self.packed is not None:
            return self.packed
        # by default only for the families tested packed: another decoder may drop the packing kwargs
        return self.device.type == "cuda" and is_bidirectional(self.model) and is_supported_family(self.model)

    def collate_packed(self, items: Sequence[EncodingInput], device: torch.device | str | None = None) -> dict:
        """Padding-free batch (see :func:`llm2vec_fast.packing.pack`) on ``device``."""
        return pack(items, device or self.device)

    def forward_packed(self, features: dict) -> torch.Tensor:
        """Embeddings ``[B, hidden]`` of a packed batch: varlen attention, varlen pooling (differentiable)."""
        return self.pool_packed(packed_hidden_states(self.model, self.model, features), features)

    def use_cuda_graphs(self, buckets: Sequence[int] | None = None, max_graphs: int = DEFAULT_MAX_GRAPHS) -> PackedCudaGraphs:
        """Run packed batches through CUDA graphs captured per padded shape (see
        :mod:`llm2vec_fast.cuda_graphs`): ``buckets`` of token counts (default: powers of two up to
        ``max_tokens_per_batch``). For small models, whose packed forward is launch-bound. Needs the
        packed path; on a CPU the padded batches run eagerly (same results)."""
        if self.packed is False:
            raise ValueError("CUDA graphs replay the packed forward: this encoder has packed=False")
        if self.device.type == "cuda" and not self.use_packed:
            logger.warning(
                "CUDA graphs replay the packed forward, which is not this encoder's default (%s is not a family tested "
                "packed): they stay unused unless packed=True",
                getattr(self.config, "model_type", "?"),
            )
        self.cuda_graphs = PackedCudaGraphs(self, buckets, max_graphs)
        return self.cuda_graphs

    def pool_packed(self, hidden: torch.Tensor, features: dict) -> torch.Tensor:
        """Pool packed hidden states ``[T, D]`` of a :meth:`collate_packed` batch into ``[B, D]``
        (sync-free: ``max_seqlen`` comes from the batch)."""
        mode = KERNEL_POOLING_MODE[self.pooling_mode]
        return masked_pool_varlen(
            hidden,
            features["cu_seqlens"],
            features["pool_mask"],
            mode,
            max_seqlen=features["max_seqlen"],
            backend=current_backend(),
        )

    def _batches(self, items: list[EncodingInput], batch_size: int) -> list[list[int]]:
        if self.use_packed:
            return token_budget_batches([len(x.input_ids) for x in items], self.max_tokens_per_batch)
        return super()._batches(items, batch_size)

    def _pads_batches(self) -> bool:
        return not self.use_packed

    def _before_encode(self, device) -> None:
        if device is not None:
            self.to(device)
        self.eval()

    @torch.inference_mode()
    def _embed_batch(self, items: Sequence[EncodingInput]) -> torch.Tensor:
        if self.use_packed:
            features = self.collate_packed(items)
            return self.cuda_graphs(features) if self.cuda_graphs is not None else self.forward_packed(features)
        return self(self.collate(items))

    encode = torch.inference_mode()(EncodeMixin.encode)
    embed_items = torch.inference_mode()(EncodeMixin.embed_items)

    # --------------------------------------------------------------------- save
    def save(
        self,
        output_path: str | os.PathLike,
        merge_before_save: bool = True,
        format: str = "llm2vec",
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
    ) -> None:
        """Write the model (LoRA adapters merged into a copy), the tokenizer and ``llm2vec_config.json``.

        ``format="sentence-transformers"`` also writes ``modules.json`` and
        ``config_sentence_transformers.json`` (with ``prompts``: instructions by name), so that
        ``SentenceTransformer(output_path, trust_remote_code=True)`` loads it (see
        :mod:`llm2vec_fast.integrations.sentence_transformers`; needs ``llm2vec-fast[st]``).
        """
        if format not in SAVE_FORMATS:
            raise ValueError(f"unknown save format {format!r}; expected one of {SAVE_FORMATS}")
        if self.quantization is not None:
            raise ValueError(
                f"a {self.quantization}-quantized encoder cannot be saved (its FP8 weights are a runtime format): save the "
                "encoder loaded without quantization, and pass quantization= when loading it"
            )
        if has_fused_projections(self.model):
            raise ValueError(
                "an encoder with fused projections (fused=True) cannot be saved: its qkv_proj / gate_up_proj weights are a "
                "runtime layout that transformers does not load; save the encoder loaded without fused=True"
            )
        if format == "sentence-transformers":
            if not is_bidirectional(self.model):
                raise ValueError("a sentence-transformers folder loads the encoder bidirectional; this encoder is causal")
            from .integrations.sentence_transformers import save_sentence_transformers

            save_sentence_transformers(self, output_path, prompts=prompts, default_prompt_name=default_prompt_name)
            return
        if prompts is not None or default_prompt_name is not None:
            raise ValueError('prompts are saved with format="sentence-transformers" only')
        os.makedirs(output_path, exist_ok=True)
        model = self.model
        if merge_before_save and hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(output_path, safe_serialization=True)
        self.tokenizer.save_pretrained(output_path)
        config = {k: getattr(self, k) for k in CONFIG_KEYS}
        config["model_id"] = self.model_id
        with open(os.path.join(output_path, "llm2vec_config.json"), "w") as f:
            json.dump(config, f, indent=4)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)
