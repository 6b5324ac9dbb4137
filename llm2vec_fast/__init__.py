"""llm2vec-fast: decoder-only LLMs as fast bidirectional text encoders (LLM2Vec recipe)."""

from .bidirectional import UnsupportedArchitectureError, UnsupportedAttentionError, enable_bidirectional
from .dataset import encode_dataset
from .default_model import DefaultModelMissingError, default_model_path
from .encoder import LLM2Vec
from .encoding import POOLING_MODES

__version__ = "0.1.0"
__all__ = [
    "LLM2Vec",
    "POOLING_MODES",
    "encode_dataset",
    "enable_bidirectional",
    "default_model_path",
    "DefaultModelMissingError",
    "UnsupportedArchitectureError",
    "UnsupportedAttentionError",
    "__version__",
]
