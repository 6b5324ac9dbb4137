"""Resolving and loading checkpoints: the embedded default model, local HF folders,
official-style LoRA adapter folders (optionally chained), hub ids when a hub is reachable."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .default_model import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME, default_model_path, is_default_model

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"bf16"``, ``"float16"``, ``"torch.float32"``, ... as a torch dtype; ValueError otherwise."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when one is there and CPU otherwise; a CUDA device this machine or this torch
    build cannot reach raises ``ValueError`` here, before any weight loads (torch's own error is an
    AssertionError from deep inside the first ``.to()``)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {str(device)!r} requested, but no CUDA GPU is usable here ({build}, torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_model_path(name_or_path: str | os.PathLike | None) -> tuple[str, str | None]:
    """Return ``(path_or_hub_id, model_id)``; ``model_id`` is the original model name used for
    the official chat wrapping."""
    if is_default_model(name_or_path):
        return str(default_model_path()), f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded, _model_id_from_folder(Path(expanded)) or name
    if os.path.exists(expanded):
        raise NotADirectoryError(f"model path {name!r} is a file; pass the checkpoint folder that holds config.json")
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name, name
    raise FileNotFoundError(
        f"model path {name!r} does not exist. Pass a local Hugging Face checkpoint folder, None / 'default' for the "
        f"default encoder, or {DEFAULT_BASE_NAME!r} for the untrained embedded {DEFAULT_MODEL_NAME}."
    )


def _model_id_from_folder(folder: Path) -> str | None:
    for file, key in (("llm2vec_config.json", "model_id"), ("config.json", "_name_or_path")):
        try:
            value = json.loads((folder / file).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if value:
            return value
    return None


#: hf_kwargs that say where a hub checkpoint comes from: the tokenizer and llm2vec_config.json follow them too
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download", "proxies", "trust_remote_code")
#: one of these holds a tokenizer's vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def hub_kwargs(hf_kwargs: dict) -> dict:
    return {k: v for k, v in hf_kwargs.items() if k in HUB_KWARGS}


def offline_hint(hf_kwargs: dict) -> str:
    """What to add to a failed hub load's error: without internet, ``HF_HUB_OFFLINE=1`` (or
    ``local_files_only=True``) skips huggingface_hub's connection retries (about 50 s before an
    unreachable hub id fails) and loads cached models from the cache alone. Empty when either is
    already set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hf_kwargs.get("local_files_only"):
        return ""
    return (
        " Without internet, set HF_HUB_OFFLINE=1 (or pass local_files_only=True): the hub client retries the connection "
        "for about 50 s first, and a cached model loads from the cache alone."
    )


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary (one of :data:`TOKENIZER_FILES`, or another
    sentencepiece ``.model`` / tiktoken file)."""
    if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return True
    return any(name.endswith((".model", ".tiktoken")) for name in os.listdir(folder))


def check_tokenizer_files(path: str) -> None:
    """A local folder must hold a tokenizer (transformers' error for a missing one blames sentencepiece)."""
    if os.path.isdir(path) and not has_tokenizer_files(path):
        raise FileNotFoundError(f"{path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:4])}, ...): save the tokenizer there too")


def read_encoder_settings(folder: str | os.PathLike, hf_kwargs: dict | None = None) -> tuple[dict, str | None]:
    """``(settings, model_id)`` stored in ``folder/llm2vec_config.json`` (``({}, None)`` without one):
    the encoder settings (pooling, lengths, instruction handling) and the original model name. For a
    hub id the file comes from the hub (or its cache), where ``hf_kwargs`` say."""
    from .encoding import CONFIG_KEYS

    path = os.path.join(os.fspath(folder), "llm2vec_config.json")
    if not os.path.isdir(os.fspath(folder)) and _HUB_ID.match(os.fspath(folder)):
        path = _hub_file(os.fspath(folder), "llm2vec_config.json", hub_kwargs(hf_kwargs or {})) or path
    if not os.path.isfile(path):
        return {}, None
    stored = read_json(path)
    return {k: v for k, v in stored.items() if k in CONFIG_KEYS}, stored.get("model_id")


def _hub_file(repo_id: str, filename: str, kwargs: dict) -> str | None:
    """``filename`` of a hub repo (downloaded or cached), ``None`` when the repo has none or cannot be reached."""
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except Exception:  # no such file, offline, gated: the checkpoint then has no stored settings
        return None


def has_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in _WEIGHT_FILES)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_base_model(path: str, dtype: torch.dtype, hf_kwargs: dict) -> nn.Module:
    """Load the bare decoder (``AutoModel``). An official "mntp" folder (config + LoRA adapter,
    no weights) loads its base from the adapter's ``base_model_name_or_path`` and merges the adapter."""
    from transformers import AutoModel

    adapter_cfg = os.path.join(path, "adapter_config.json")
    if os.path.isdir(path) and os.path.isfile(adapter_cfg) and not has_weights(path):
        base = read_json(adapter_cfg).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_cfg} names no base_model_name_or_path")
        try:
            base_path, _ = resolve_model_path(base)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise FileNotFoundError(f"{adapter_cfg} names base_model_name_or_path {base!r}, which cannot be loaded: {err}") from None
        model = AutoModel.from_pretrained(base_path, dtype=dtype, **hf_kwargs)
        return apply_adapters(model, [path], merge_last=True)
    try:
        return AutoModel.from_pretrained(path, dtype=dtype, **hf_kwargs)
    except OSError as err:
        raise OSError(f"could not load a model from {path!r}: {err}") from err


def apply_adapters(model: nn.Module, adapter_paths: list[str], merge_last: bool) -> nn.Module:
    """Apply LoRA adapters in order; every adapter but the last is merged (MNTP -> SimCSE chains)."""
    from peft import PeftModel

    for i, adapter in enumerate(adapter_paths):
        adapter = os.path.expanduser(os.fspath(adapter))
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {adapter!r}")
        model = PeftModel.from_pretrained(model, adapter)
        if i < len(adapter_paths) - 1 or merge_last:
            model = model.merge_and_unload()
    return model


# adapter_config.json options that change what a LoRA delta is: merge_lora handles none of them
_LORA_VARIANTS = ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication")


def merge_lora(model: nn.Module, adapter: str | os.PathLike) -> nn.Module:
    """Merge a plain LoRA adapter into ``model``'s weights in place (``W += lora_alpha / r * B @ A``):
    what peft's ``merge_and_unload`` gives, without building and unloading 200+ LoRA modules first
    (several seconds per adapter on a CPU). Adapters using other LoRA options go through peft."""
    from safetensors.torch import load_file

    adapter = os.fspath(adapter)
    config = read_json(os.path.join(adapter, "adapter_config.json"))
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    plain = (
        config.get("peft_type") == "LORA"
        and config.get("bias", "none") == "none"
        and not any(config.get(k) for k in _LORA_VARIANTS)
        and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    )
    if not plain:
        return apply_adapters(model, [adapter], merge_last=True)
    scale = config["lora_alpha"] / config["r"]
    modules = dict(model.named_modules())
    prefix = "base_model.model."
    with torch.no_grad():
        for key, a in weights.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[: -len(".lora_A.weight")].removeprefix(prefix)
            if name not in modules:
                raise ValueError(f"adapter {adapter!r} has weights for {name!r}, which the model does not have")
            layer = modules[name]
            b = weights[key[: -len("lora_A.weight")] + "lora_B.weight"]
            w = layer.weight
            if w.dtype == torch.float32:  # in place, no [out, in] temporary
                w.addmm_(b.to(w.dtype), a.to(w.dtype), alpha=scale)
            else:  # half-precision weights: the delta in fp32, rounded once
                w += ((b.float() @ a.float()) * scale).to(w.dtype)
    return model
