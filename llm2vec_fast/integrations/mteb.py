"""Evaluate llm2vec-fast encoders with MTEB 2 (``pip install llm2vec-fast[mteb]``).

:class:`MTEBEncoder` implements mteb's ``EncoderProtocol`` around an :class:`~llm2vec_fast.LLM2Vec`
or :class:`~llm2vec_fast.export.OnnxEncoder`::

    import mteb
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.integrations.mteb import MTEBEncoder

    model = MTEBEncoder(LLM2Vec.from_pretrained("default"))  # or a base model with your adapters (peft_model_name_or_path)
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

Instructions follow the LLM2Vec convention: each text is encoded as ``[instruction, text]``
(instruction tokens attended to, not pooled). Queries and the texts of symmetric tasks (STS,
classification, clustering, pair classification; mteb passes ``prompt_type=None``) get the task's
instruction; documents (``prompt_type="document"``: retrieval corpora, reranking candidates) get
none. The instruction of a task is, in order: ``instructions[task name]`` given by the user (used
verbatim; ``""`` means none), the official LLM2Vec table
(:data:`~llm2vec_fast.integrations.instructions.LLM2VEC_TASK_INSTRUCTIONS`), then the prompt mteb
defines for the task, formatted as LLM2Vec does (``"... text."`` -> ``"... text:"``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..encoding import EncodeMixin
from .instructions import LLM2VEC_TASK_INSTRUCTIONS

try:
    import mteb
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.similarity_functions import cos_sim, pairwise_cos_sim
    from mteb.types import PromptType
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("llm2vec_fast.integrations.mteb needs mteb 2: pip install 'llm2vec-fast[mteb]'") from err

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


def llm2vec_instruction(prompt: str) -> str:
    """An mteb task prompt in the LLM2Vec style: trailing periods dropped, ending in a colon."""
    prompt = prompt.strip()
    if prompt and not prompt.endswith(":"):
        prompt = prompt.rstrip(".") + ":"
    return prompt


def _prompt_type_value(prompt_type) -> str | None:
    if prompt_type is None:
        return None
    return prompt_type.value if isinstance(prompt_type, PromptType) else str(prompt_type)


class MTEBEncoder:
    """mteb ``EncoderProtocol`` around an llm2vec-fast encoder.

    Args:
        encoder: an :class:`~llm2vec_fast.LLM2Vec` or :class:`~llm2vec_fast.export.OnnxEncoder`.
        instructions: per-task overrides, task name -> instruction (verbatim; ``""``: no
            instruction). Keys ``"<task>-query"`` / ``"<task>-document"`` set one side only.
        use_default_instructions: fall back to the official LLM2Vec table, then to mteb's task
            prompt (``False``: no instruction unless ``instructions`` names the task).
        model_name: name in the results (``organization/model``); default from the encoder.
        revision: revision recorded in the results.
        batch_size: default inputs per forward pass (mteb's ``encode_kwargs`` override it).
        truncate_dim: evaluate Matryoshka prefixes of this many dimensions.
    """

    def __init__(
        self,
        encoder: EncodeMixin,
        *,
        instructions: Mapping[str, str] | None = None,
        use_default_instructions: bool = True,
        model_name: str | None = None,
        revision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        truncate_dim: int | None = None,
    ):
        if not hasattr(encoder, "encode") or not hasattr(encoder, "hidden_size"):
            raise TypeError(f"encoder must be an LLM2Vec or OnnxEncoder, got {type(encoder).__name__}")
        if instructions is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in instructions.items()):
            raise TypeError("instructions must map task names to instruction strings")
        from ..quantization import check_truncate_dim

        check_truncate_dim(truncate_dim, encoder.hidden_size)
        self.encoder = encoder
        self.instructions = dict(instructions or {})
        self.use_default_instructions = bool(use_default_instructions)
        self.batch_size = int(batch_size)
        self.truncate_dim = truncate_dim
        self._meta = self._build_meta(model_name, revision)

    @classmethod
    def from_pretrained(
        cls, model_name: str | None = None, revision: str | None = None, *, device: str | None = None, **kwargs: Any
    ) -> MTEBEncoder:
        """Load an :class:`~llm2vec_fast.LLM2Vec` (``model_name``: checkpoint folder, ``None`` for the
        default model; other ``LLM2Vec.from_pretrained`` options in ``kwargs``) and wrap it. This is
        the ``EncoderProtocol`` constructor signature mteb's loaders use."""
        from ..encoder import LLM2Vec

        wrapper_keys = ("instructions", "use_default_instructions", "batch_size", "truncate_dim")
        wrapper_kwargs = {k: kwargs.pop(k) for k in wrapper_keys if k in kwargs}
        encoder = LLM2Vec.from_pretrained(model_name, device=device, **kwargs)
        return cls(encoder, revision=revision, **wrapper_kwargs)

    # ------------------------------------------------------------------ metadata
    def _build_meta(self, model_name: str | None, revision: str | None) -> ModelMeta:
        enc = self.encoder
        if model_name is None:
            model_name = str(enc.model_id or getattr(enc, "path", None) or "model")
        if os.path.exists(os.path.expanduser(model_name)):  # a local folder: its name
            model_name = os.path.basename(os.path.normpath(model_name))
        if "/" not in model_name:
            model_name = f"llm2vec-fast/{model_name}"
        is_onnx = type(enc).__name__ == "OnnxEncoder"
        n_params = None
        if hasattr(enc, "model") and hasattr(enc.model, "parameters"):
            n_params = sum(p.numel() for p in enc.model.parameters())
        return ModelMeta(
            loader=None,
            name=re.sub(r"[^\w./-]", "_", model_name),
            revision=revision,
            release_date=None,
            languages=None,
            n_parameters=n_params,
            memory_usage_mb=None,
            max_tokens=enc.max_length,
            embed_dim=self.truncate_dim or enc.hidden_size,
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["LLM2Vec", "ONNX" if is_onnx else "PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=True,
            training_datasets=None,
        )

    @property
    def mteb_model_meta(self) -> ModelMeta:
        return self._meta

    # --------------------------------------------------------------- instructions
    def instruction_for(self, task_metadata, prompt_type=None) -> str:
        """The instruction given to texts of ``task_metadata`` with ``prompt_type`` (see the module doc)."""
        side = _prompt_type_value(prompt_type)
        name = task_metadata.name
        if side is not None and f"{name}-{side}" in self.instructions:
            return self.instructions[f"{name}-{side}"]
        if side == PromptType.document.value:
            return ""
        if name in self.instructions:
            return self.instructions[name]
        if not self.use_default_instructions:
            return ""
        # a task derived from one of the table's (MTEB v2's HardNegatives, ".v2" variants) takes its instruction
        for source in (name, *(getattr(task_metadata, "adapted_from", None) or ())):
            if source in LLM2VEC_TASK_INSTRUCTIONS:
                return LLM2VEC_TASK_INSTRUCTIONS[source]
        return llm2vec_instruction(_mteb_task_prompt(task_metadata, prompt_type))

    # -------------------------------------------------------------------- encode
    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type=None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embeddings ``[N, dim]`` (float32) of the texts of an mteb ``DataLoader[BatchedInput]``."""
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"llm2vec-fast encodes text only; task {task_metadata.name} gives {sorted(batch)}")
            texts.extend(batch["text"])
        if not texts:
            return np.zeros((0, self.truncate_dim or self.encoder.hidden_size), dtype=np.float32)
        instruction = self.instruction_for(task_metadata, prompt_type)
        items = [[instruction, t] for t in texts] if instruction else texts
        return self.encoder.encode(
            items,
            batch_size=int(kwargs.get("batch_size") or self.batch_size),
            show_progress_bar=kwargs.get("show_progress_bar"),
            convert_to_numpy=True,
            truncate_dim=self.truncate_dim,
        )

    def similarity(self, embeddings1, embeddings2):
        """Cosine similarity matrix ``[N1, N2]`` (the similarity the encoders are trained for)."""
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Cosine similarity of each pair ``[N]``."""
        return pairwise_cos_sim(embeddings1, embeddings2)


def _mteb_task_prompt(task_metadata, prompt_type) -> str:
    """The prompt mteb itself defines for a task (task metadata, else its abstract task class)."""
    prompt = task_metadata.prompt
    side = _prompt_type_value(prompt_type)
    if isinstance(prompt, dict):
        prompt = prompt.get(side or "query") or ""
    if prompt:
        return prompt
    from mteb.abstasks.abstask import get_abstask_prompt

    return get_abstask_prompt(task_metadata.name) or ""


# ---------------------------------------------------------------------------------- running
class TaskDataMissingError(FileNotFoundError):
    """An mteb task's data is not available locally."""


def get_tasks(names: list[str]) -> list:
    """mteb task objects by name, with a clear error for unknown names."""
    tasks = []
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError as err:
            raise ValueError(f'unknown MTEB task {name!r}; list them with `python -c "import mteb; print(mteb.get_tasks())"`') from err
    return tasks


def load_task_data(task) -> None:
    """Load ``task``'s data from local files only (HF datasets cache or offline copies); raise
    :class:`TaskDataMissingError` naming the task and how to supply its data if it is not there."""
    import datasets

    was_offline = datasets.config.HF_HUB_OFFLINE
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    datasets.config.HF_HUB_OFFLINE = True
    try:
        task.load_data()
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ... offline
        dataset = getattr(task.metadata, "dataset", {}) or {}
        path, rev = dataset.get("path", "?"), dataset.get("revision")
        raise TaskDataMissingError(
            f"MTEB task {task.metadata.name!r}: its data (Hugging Face dataset {path!r}"
            f"{f' at revision {rev}' if rev else ''}) is not available locally, and llm2vec-fast never downloads "
            f'at run time. Download it once on a machine with internet (e.g. `python -c "import mteb; '
            f"mteb.get_task('{task.metadata.name}').load_data()\"`), then copy the Hugging Face cache "
            f"(~/.cache/huggingface, or $HF_HOME / $HF_DATASETS_CACHE) here. ({type(err).__name__}: {err})"
        ) from err
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_mteb(
    model: MTEBEncoder,
    tasks: list,
    *,
    output_folder: str | os.PathLike | None = None,
    batch_size: int | None = None,
    show_progress_bar: bool = True,
) -> dict[str, dict]:
    """Evaluate ``model`` on ``tasks`` (names or task objects) whose data is available locally.

    Every task's data is loaded (offline) before any is evaluated, so a missing dataset fails at
    once. Results are written under ``output_folder`` (mteb's result cache layout) when given.
    Returns ``{task name: {split: main score and the other scores of its first subset}}``.
    """
    tasks = get_tasks([t for t in tasks if isinstance(t, str)]) + [t for t in tasks if not isinstance(t, str)]
    if not tasks:
        raise ValueError("no MTEB task given")
    for task in tasks:
        if not task.data_loaded:
            load_task_data(task)
    cache = mteb.ResultCache(cache_path=str(output_folder)) if output_folder is not None else None
    encode_kwargs = {"batch_size": batch_size or model.batch_size, "show_progress_bar": show_progress_bar}
    result = mteb.evaluate(
        model,
        tasks,
        encode_kwargs=encode_kwargs,
        cache=cache,
        overwrite_strategy="always",
        show_progress_bar=show_progress_bar,
    )
    return {
        task_result.task_name: {split: scores[0] for split, scores in task_result.scores.items() if scores}
        for task_result in result.task_results
    }
