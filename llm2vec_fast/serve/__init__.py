"""Embedding server (``llm2vec-fast serve``; ``pip install llm2vec-fast[serve]``): OpenAI-compatible
``/v1/embeddings`` and TEI-style ``/embed`` with token-budget dynamic batching and Prometheus metrics."""

from .app import ServeSettings, create_app
from .batcher import Batcher, QueueFull
from .runner import run_server

__all__ = ["ServeSettings", "create_app", "run_server", "Batcher", "QueueFull"]
