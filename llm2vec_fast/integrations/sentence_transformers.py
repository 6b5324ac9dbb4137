"""Load llm2vec-fast encoders with sentence-transformers 6 (``pip install llm2vec-fast[st]``).

:func:`save_sentence_transformers` (``LLM2Vec.save(path, format="sentence-transformers")``)
writes a folder that ``SentenceTransformer(path, trust_remote_code=True)`` loads:

* the merged model weights (safetensors), the tokenizer and ``llm2vec_config.json`` (pooling,
  lengths, instruction handling) as :meth:`LLM2Vec.save` writes them;
* ``modules.json`` naming one module, :class:`LLM2VecModule`, by its import path in the
  *installed* ``llm2vec_fast`` package;
* ``config_sentence_transformers.json`` with ``prompts`` (instructions by name, used with
  ``encode(..., prompt_name=...)``; ``encode_query`` uses ``"query"``) and cosine similarity.

Why ``trust_remote_code=True``: sentence-transformers 6 refuses any module class outside its own
``sentence_transformers.*`` namespace unless the flag is passed, because importing a class named
by a model folder runs code. Its own modules cannot reproduce LLM2Vec: bidirectional attention
needs our patch, and its ``Pooling(include_prompt=False)`` cuts the prompt at a different token
boundary than the LLM2Vec tokenisation (instruction and text tokenised together, the last
``len(tokenize(text))`` tokens pooled), which gave only about 0.99 cosine. What runs is the
``llm2vec_fast`` package you installed: the folder holds no Python file, the class path has more
than one dot so transformers' dynamic-module loader never looks for a file in the folder, and the
model is loaded without ``trust_remote_code`` (an ``auto_map`` in its ``config.json`` is ignored).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import sentence_transformers
    from sentence_transformers.base.modules import InputModule
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "llm2vec_fast.integrations.sentence_transformers needs sentence-transformers 6: pip install 'llm2vec-fast[st]'"
    ) from err

logger = logging.getLogger(__name__)

MODULE_CLASS = "llm2vec_fast.integrations.sentence_transformers.LLM2VecModule"
# Default prompts: LLM2Vec instructions (queries get one, documents none; see the README)
DEFAULT_PROMPTS = {
    "query": "Given a web search query, retrieve relevant passages that answer the query:",
    "document": "",
    "sts": "Retrieve semantically similar text:",
}


class LLM2VecModule(InputModule):
    """A whole :class:`~llm2vec_fast.LLM2Vec` encoder as one sentence-transformers input module.

    ``preprocess`` tokenises each text with the ``prompt`` (if any) as its LLM2Vec instruction, as
    ``LLM2Vec.encode([[prompt, text], ...])`` does; ``forward`` runs the bidirectional model and
    pools the text tokens only, into ``features["sentence_embedding"]`` (float32).
    """

    save_in_root = True
    config_file_name = "llm2vec_config.json"

    def __init__(self, encoder):
        super().__init__()
        from ..encoder import LLM2Vec

        if not isinstance(encoder, LLM2Vec):
            raise TypeError(f"LLM2VecModule wraps an LLM2Vec encoder, got {type(encoder).__name__}")
        self.encoder = encoder

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> LLM2VecModule:
        """Load the encoder saved in the folder (``trust_remote_code`` is deliberately not passed on)."""
        from ..encoder import LLM2Vec

        folder = cls.load_dir_path(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        model_kwargs = dict(model_kwargs or {})
        dtype = model_kwargs.pop("dtype", None) or model_kwargs.pop("torch_dtype", None)
        if dtype == "auto":
            dtype = None
        if model_kwargs:
            logger.warning("LLM2VecModule ignores model_kwargs %s", sorted(model_kwargs))
        return cls(LLM2Vec.from_pretrained(folder, dtype=dtype, device="cpu"))

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.encoder.save(output_path)

    # --------------------------------------------------------------- interface
    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError("max_seq_length must be positive")
        self.encoder.max_length = int(value)

    def get_config_dict(self) -> dict[str, Any]:
        from ..encoding import CONFIG_KEYS

        return {k: getattr(self.encoder, k) for k in CONFIG_KEYS}

    def get_embedding_dimension(self) -> int:
        return self.encoder.hidden_size

    def get_sentence_embedding_dimension(self) -> int:
        return self.encoder.hidden_size

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, positions and the pooled-token mask of a batch of texts; the
        ``prompt`` is their instruction (attended to, not pooled)."""
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise TypeError(f"inputs[{i}] must be a string (give instructions as prompts: prompt_name= or prompt=), got {text!r:.80}")
        items = self.encoder._prepare([(prompt or "", text) for text in inputs])
        return {k: torch.from_numpy(v) for k, v in self.encoder.padded_batch(items).items()}

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        features["sentence_embedding"] = self.encoder(features).float()
        return features


def save_sentence_transformers(
    encoder,
    output_path: str | os.PathLike,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
) -> Path:
    """Write ``encoder`` as a sentence-transformers folder (see the module doc); returns its path.

    ``prompts``: instruction by name (default :data:`DEFAULT_PROMPTS`); ``default_prompt_name``:
    the one ``encode`` uses when neither ``prompt_name`` nor ``prompt`` is given (default none).
    """
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise TypeError("prompts must map names to instruction strings")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts {sorted(prompts)}")
    out = Path(output_path)
    encoder.save(out)
    (out / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}], indent=2) + "\n")
    import transformers

    from .. import __version__

    config = {
        "model_type": "SentenceTransformer",
        "__version__": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
            "llm2vec_fast": __version__,
        },
        "prompts": prompts,
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    }
    (out / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
