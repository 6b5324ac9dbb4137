"""llm2vec-fast."""
