"""``OnnxEncoder``: run an exported encoder folder with ONNX Runtime, with ``LLM2Vec.encode``'s API.

The folder is what :func:`~llm2vec_fast.export.export_onnx` writes: ``model.onnx`` (plus
``model.onnx.data`` for models over 2 GB), the tokenizer files and ``llm2vec_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..encoding import CONFIG_KEYS, EncodeMixin, check_encoder_settings
from ..loading import TOKENIZER_FILES, has_tokenizer_files
from ..prompting import EncodingInput
from ..tokenization import padding_tokenizer
from .wrapper import INPUT_NAMES, OUTPUT_NAME

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "llm2vec_config.json"
GPU_INSTALL_HINT = "pip install llm2vec-fast[onnx-gpu]"
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
RUNTIMES = ("onnxruntime", "openvino")
UNRECORDED_OPENVINO_GROUP_SIZE = 32
OPENVINO_PROVIDER = "OpenVINO:CPU"  # openvino_runtime.PROVIDER_NAME (not imported: openvino is optional)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("OnnxEncoder needs onnxruntime: pip install llm2vec-fast[onnx] (or [onnx-gpu] for CUDA)") from err
    return onnxruntime


def resolve_providers(providers: str | Sequence | None, available: Sequence[str]) -> list:
    """Normalise ``providers`` (``None`` = CPU; ``"cuda"``/``"cpu"`` aliases; ORT names or
    ``(name, options)`` tuples) and check they are installed."""
    if providers is None:
        providers = ["CPUExecutionProvider"]
    elif isinstance(providers, str):
        providers = [providers]
    out = []
    for p in providers:
        name, options = (p[0], p[1]) if isinstance(p, (tuple, list)) else (p, None)
        if not isinstance(name, str):
            raise TypeError(f"providers must be names or (name, options) pairs, got {p!r}")
        name = PROVIDER_ALIASES.get(name.lower(), name)
        if name not in available:
            hint = f" For CUDA install onnxruntime-gpu: {GPU_INSTALL_HINT}" if name == "CUDAExecutionProvider" else ""
            raise ValueError(f"ONNX Runtime execution provider {name!r} is not available; available providers: {list(available)}.{hint}")
        out.append((name, options) if options else name)
    return out


def _check_int8_weights(config: dict, providers: list, folder: Path) -> None:
    """8-bit int8 weights saturate in ONNX Runtime's CPU GEMM on x86 without VNNI/AMX (see
    ``cpu_int8``): say so instead of returning quietly wrong embeddings. The int8-openvino graph's
    weights sit behind a ``DequantizeLinear``, which neither runtime multiplies with the saturating
    instruction (ONNX Runtime's 8-bit ``MatMulNBits`` on an AVX2 EPYC: worst cosine 0.993)."""
    from .cpu_int8 import has_int8_dot, is_x86

    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    onnx_config = config.get("onnx", {})
    if onnx_config.get("precision") == "int8-openvino" or onnx_config.get("int8_weight_bits") != 8:
        return
    if first == "CPUExecutionProvider" and is_x86() and not has_int8_dot():
        logger.warning(
            "%s holds 8-bit int8 weights, which need a CPU with VNNI or AMX; this CPU has neither, so ONNX Runtime's "
            "int8 GEMM saturates and the embeddings are wrong. Re-export on this machine (or with --int8-weights 7bit).",
            folder,
        )


class OpenVINOFp32Warning(UserWarning):
    """OpenVINO runs an int8-openvino export in fp32 on this CPU (no VNNI): right, but not faster."""


def warn_if_openvino_computes_fp32(what: str, stacklevel: int = 1) -> None:
    """An int8-openvino export runs on int8 GEMMs only where OpenVINO quantizes activations (x86:
    VNNI, see ``cpu_int8``); elsewhere it computes in fp32 from the widened int8 weights (right, and
    about as slow as fp32): say so about ``what``, with the export that is fast on this CPU.
    ``stacklevel`` as for ``warnings.warn``, counted from the caller."""
    from .cpu_int8 import openvino_quantizes_activations

    if not openvino_quantizes_activations():
        warnings.warn(
            f"{what}: OpenVINO runs int8-openvino exports on int8 GEMMs only on a CPU with VNNI (AVX-VNNI or AVX-512 "
            "VNNI), which this one lacks, so here it multiplies in fp32 with the int8 weights widened (about fp32 speed). "
            "For int8 speed on this CPU, export --precision int8 (ONNX Runtime).",
            OpenVINOFp32Warning,
            stacklevel=stacklevel + 1,
        )


class OnnxEncoder(EncodeMixin):
    """An exported LLM2Vec encoder run by ONNX Runtime; ``encode()`` behaves as ``LLM2Vec.encode``
    (same tokenisation, instruction handling, batching and output types)."""

    def __init__(self, session, tokenizer, settings: dict, model_id: str | None, hidden_size: int, path: str | None = None):
        check_encoder_settings(settings["pooling_mode"], settings["max_length"], settings["doc_max_length"])
        self.session = session
        self.tokenizer = padding_tokenizer(tokenizer)  # a right-padding copy; the caller's object never changes
        self.pooling_mode = settings["pooling_mode"]
        self.max_length = int(settings["max_length"])
        self.doc_max_length = int(settings["doc_max_length"])
        self.skip_instruction = bool(settings["skip_instruction"])
        self.model_id = model_id
        self.hidden_size = int(hidden_size)
        self.path = path
        self.providers = session.get_providers()
        self.runtime = "openvino" if self.providers[0] == OPENVINO_PROVIDER else "onnxruntime"
        self._use_io_binding = self.runtime == "onnxruntime" and self.providers[0] != "CPUExecutionProvider"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        providers: str | Sequence | None = None,
        num_threads: int | None = None,
        session_options=None,
        runtime: str | None = None,
        inference_precision: str = "f32",
    ) -> OnnxEncoder:
        """Load an exported folder.

        Args:
            path: folder written by ``export_onnx`` / ``llm2vec-fast export``.
            providers: ``None`` (CPU), ``"cuda"``, ``"cpu"``, or a list of ONNX Runtime provider
                names / ``(name, options)`` pairs, in priority order. CUDA needs ``onnxruntime-gpu``
                (``pip install llm2vec-fast[onnx-gpu]``); a missing provider raises ``ValueError``.
            num_threads: intra-op threads on CPU (default: ``$OMP_NUM_THREADS`` if set, else
                ONNX Runtime's choice, one per physical core).
            session_options: an ``onnxruntime.SessionOptions`` to use as is (overrides ``num_threads``).
            runtime: ``"onnxruntime"``, or ``"openvino"`` (CPU; ``pip install llm2vec-fast[openvino]``;
                see :mod:`.openvino_runtime`), which runs the same graph with the same ``encode()``.
                Default: the runtime the folder's precision is made for (OpenVINO for
                ``int8-openvino``, ONNX Runtime otherwise).
            inference_precision: OpenVINO only: ``"f32"`` (default, the graph's precision) or
                ``"bf16"``/``"f16"`` (faster where the CPU has them, less faithful).
        """
        if runtime is not None and runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        from transformers import AutoTokenizer

        from .precisions import precision_runtime

        folder = Path(path).expanduser()
        model_file = folder / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"no {MODEL_FILE} in {str(folder)!r}; export one with `llm2vec-fast export`")
        missing = [name for name in (CONFIG_FILE, "tokenizer_config.json") if not (folder / name).is_file()]
        if not has_tokenizer_files(folder):
            missing.append(" or ".join(TOKENIZER_FILES))
        if missing:
            raise FileNotFoundError(
                f"the export folder {str(folder)!r} is incomplete: no {', '.join(missing)} (copy the whole folder, or export again)"
            )
        with open(folder / CONFIG_FILE) as f:
            config = json.load(f)
        precision = config.get("onnx", {}).get("precision")
        made_for = precision_runtime(precision)
        if runtime is None:
            runtime = made_for
        elif made_for == "openvino" and runtime != made_for:
            logger.warning(
                "%s is a %s export, made for %s; under %s it runs without its int8 speed-up", folder, precision, made_for, runtime
            )
        if runtime == "onnxruntime" and inference_precision != "f32":
            raise ValueError("inference_precision applies to runtime='openvino' only")
        settings = {k: config[k] for k in CONFIG_KEYS}
        report = folder / "export_report.json"
        if report.is_file() and json.loads(report.read_text()).get("status") == "failed":
            logger.warning("%s failed validation at export time (see export_report.json)", folder)
        threads = num_threads if num_threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {threads}")
        if runtime == "openvino":
            from .openvino_runtime import DYNAMIC_QUANTIZATION_GROUP_SIZE, OpenVINOSession

            if providers not in (None, "cpu", "CPUExecutionProvider") or session_options is not None:
                raise ValueError("runtime='openvino' runs on the CPU; providers and session_options are ONNX Runtime settings")
            if precision == "int8-openvino":
                warn_if_openvino_computes_fp32(f"{folder} is an int8-openvino export", stacklevel=2)
            _check_int8_weights(config, ["CPUExecutionProvider"], folder)
            # the group size the export was validated with; int8-openvino folders written before it was
            # recorded were validated with 32
            unrecorded = UNRECORDED_OPENVINO_GROUP_SIZE if precision == "int8-openvino" else DYNAMIC_QUANTIZATION_GROUP_SIZE
            group = config["onnx"].get("activation_group_size", unrecorded)
            session = OpenVINOSession(model_file, threads, inference_precision, activation_group_size=group)
            return cls(session, AutoTokenizer.from_pretrained(folder), settings, config.get("model_id"), config["hidden_size"], str(folder))
        ort = _import_onnxruntime()
        providers = resolve_providers(providers, ort.get_available_providers())
        _check_int8_weights(config, providers, folder)
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session_options.intra_op_num_threads = threads
            session_options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model_file), sess_options=session_options, providers=providers)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        hidden = config.get("hidden_size") or session.get_outputs()[0].shape[-1]
        return cls(session, tokenizer, settings, config.get("model_id"), hidden, str(folder))

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu")

    def onnx_inputs(self, items: Sequence[EncodingInput]) -> dict[str, np.ndarray]:
        """The graph's int64 inputs for a batch (``pool_mask`` as 0/1 int64)."""
        batch = self.padded_batch(items)
        return {name: batch[name].astype(np.int64, copy=False) for name in INPUT_NAMES}

    def _before_encode(self, device) -> None:
        if device is not None and torch.device(device).type != self.device.type:
            raise ValueError(
                f"OnnxEncoder runs on {self.device.type} (providers {self.providers}); choose the device with "
                f"OnnxEncoder.from_pretrained(..., providers=...), not encode(device=...)"
            )

    def _embed_batch(self, items: Sequence[EncodingInput]) -> torch.Tensor:
        feeds = self.onnx_inputs(items)
        if not self._use_io_binding:
            return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0])
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(OUTPUT_NAME, self.device.type)
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0])
