"""The library's own copy of a tokenizer, set up the way the library pads and truncates.

Llama and Gemma tokenizers in transformers 5 default to *left* padding, some tokenizers truncate
on the left, many have no pad token. Code that pads with ``padding=True`` and then slices
``[i, :n]`` (MNTP batches) assumes right padding; the encoder's pooled span assumes the end of a
long text is what gets cut. Every place in the library that tokenizes therefore goes through
:func:`padding_tokenizer`, which returns a *copy*: the caller's tokenizer object is never changed.
"""

from __future__ import annotations

import copy


def _own_copy(tokenizer):
    """A copy that owns its Python-side settings (padding/truncation sides, special-token maps) and
    shares the compiled vocabulary. ``copy.deepcopy`` of a fast tokenizer re-serialises the whole
    vocabulary (~0.5 s for SmolLM2); the shared Rust backend is safe because transformers sets its
    padding and truncation from the calling object's settings on every call."""
    tok = copy.copy(tokenizer)
    for name, value in vars(tokenizer).items():
        if isinstance(value, (dict, list, set)):
            setattr(tok, name, copy.copy(value))
    return tok


def padding_tokenizer(tokenizer, *, copy_tokenizer: bool = True):
    """``tokenizer`` (a copy unless ``copy_tokenizer=False``) with right padding, right truncation and
    a pad token (its EOS token when it has none).

    Raises:
        ValueError: the tokenizer has neither a pad token nor an EOS token.
    """
    tok = _own_copy(tokenizer) if copy_tokenizer else tokenizer
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an EOS token to pad with; set tokenizer.pad_token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.truncation_side = "right"
    return tok
