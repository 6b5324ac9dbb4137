"""Integrations with other libraries, each an optional extra imported on use:
``llm2vec_fast.integrations.mteb`` (``[mteb]``) and ``llm2vec_fast.integrations.sentence_transformers`` (``[st]``)."""
