"""Turning ``text`` / ``[instruction, text]`` inputs into token ids plus the span to pool.

This follows the official llm2vec 0.2.3 ``LLM2Vec`` step by step
(``_convert_to_str`` -> ``prepare_for_tokenization`` -> ``tokenize``):

* the text is trimmed to ``doc_max_length`` tokens by dropping words (cut by tokens where that would
  leave no word: the official code returns an empty text there);
* instruction and text are joined around a separator, the model-specific chat wrapping is
  applied to the joined string, then the separator is removed;
* the pooled span is the last ``len(tokenize(text, add_special_tokens=False))`` tokens, so
  instruction tokens are attended to but not pooled.

Deliberate differences (documented in the README):
* ``eos_token`` pooling appends the tokenizer's real EOS *token id* after truncation (the
  official code appends the literal text " </s>" for every Llama/Mistral config, which is
  not the EOS of e.g. Llama 3 or SmolLM2, and can be truncated away);
* an empty text pools over all real tokens (the official slice ``[-0:]`` pools padding), and
  an input with no tokens at all is encoded as a single EOS token, so nothing is NaN;
* the separator is split once, where it was inserted, so an instruction or a text that itself
  contains it is kept intact;
* an input cut at ``max_length`` pools only what is left of its text (the official span, counted
  from the end, reaches back into the instruction), like an empty text when nothing is left.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SEPARATOR = "!@#$%^&*()"

# Chat wrapping of the official library, keyed by the checkpoint's original model id.
_WRAP_LLAMA3 = ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
_WRAP_INST = ("[INST] ", " [/INST]")
_WRAP_GEMMA2 = ("<bos><start_of_turn>user\n", "<end_of_turn>")
_WRAP_QWEN2 = ("<|im_start|>user\n", "<|im_end|>")
CHAT_WRAPPING = {
    "meta-llama/Meta-Llama-3-8B-Instruct": _WRAP_LLAMA3,
    "mistralai/Mistral-7B-Instruct-v0.2": _WRAP_INST,
    "meta-llama/Llama-2-7b-chat-hf": _WRAP_INST,
    "google/gemma-2-9b-it": _WRAP_GEMMA2,
    "Qwen/Qwen2-1.5B-Instruct": _WRAP_QWEN2,
    "Qwen/Qwen2-7B-Instruct": _WRAP_QWEN2,
}


@dataclass(frozen=True)
class EncodingInput:
    """One tokenised input: ``input_ids`` (no padding) and how many trailing tokens to pool."""

    input_ids: list[int]
    num_pooled: int
    truncated: bool = False  # the text was trimmed to doc_max_length, or the whole input cut at max_length


def normalize_inputs(sentences: object) -> tuple[list[tuple[str, str]], bool]:
    """Validate ``encode`` input; return ``(instruction, text)`` pairs and whether a single
    string was given (which yields a 1-D result, as in sentence-transformers)."""
    if isinstance(sentences, str):
        return [("", sentences)], True
    if not isinstance(sentences, Sequence) and hasattr(sentences, "tolist") and hasattr(sentences, "__len__"):
        return normalize_inputs(sentences.tolist())  # a numpy array or pandas Series of texts (or of pairs)
    if not isinstance(sentences, Sequence) or isinstance(sentences, (bytes, bytearray)):
        raise TypeError(f"sentences must be a string or a list of strings / [instruction, text] pairs, got {type(sentences).__name__}")
    if len(sentences) == 0:
        raise ValueError("encode() got an empty list of sentences; pass at least one text")
    pairs = []
    for i, item in enumerate(sentences):
        if isinstance(item, str):
            pairs.append(("", item))
        elif _is_pair(item):
            pairs.append((item[0], item[1]))
        else:
            raise TypeError(f"sentences[{i}] must be a string or an [instruction, text] pair of strings, got {item!r:.80}")
    return pairs, False


def _is_pair(item: object) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)


def chat_wrapping(model_id: str | None) -> tuple[str, str] | None:
    """``(prefix, suffix)`` the official library wraps ``model_id``'s inputs in, ``None`` for none."""
    return CHAT_WRAPPING.get(model_id or "")


def chat_wrap(text: str, model_id: str | None) -> str:
    """The official ``prepare_for_tokenization`` wrapping (without the EOS part)."""
    wrap = chat_wrapping(model_id)
    return f"{wrap[0]}{text.strip()}{wrap[1]}" if wrap else text


def trim_to_doc_max_length(tokenizer, text: str, doc_max_length: int, max_length: int) -> tuple[str, bool]:
    """``(text, trimmed)``: trailing words dropped until ``text`` has at most ``doc_max_length`` tokens
    (official ``_convert_to_str``). Where that would leave no word at all (one long "word": a text
    in a script without spaces, a URL, code), the text is cut after its first ``doc_max_length``
    tokens instead: the official loop returns an empty text there."""

    def n_tokens(t: str) -> int:
        return len(tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])

    length, trimmed = n_tokens(text), False
    while length > doc_max_length:
        trimmed = True
        words = text.split()
        keep = int(len(words) * doc_max_length / length)
        if keep == 0:
            return _first_tokens(tokenizer, text, doc_max_length, n_tokens), True
        text = " ".join(words[:keep])
        length = n_tokens(text)
    return text, trimmed


def _first_tokens(tokenizer, text: str, n: int, n_tokens) -> str:
    """The longest prefix of ``text`` that its first ``n`` tokens cover and that tokenizes to at most
    ``n`` tokens again (a token can end inside a character, whose rest is then another token). The
    prefix comes from a fast tokenizer's character offsets; a slow one decodes the tokens."""
    take = n
    while take > 0:
        if getattr(tokenizer, "is_fast", False):
            encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=take, return_offsets_mapping=True)
            prefix = text[: encoded["offset_mapping"][-1][1]] if encoded["offset_mapping"] else ""
        else:
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=take)["input_ids"]
            prefix = tokenizer.decode(ids).rstrip("\ufffd")  # a character cut between its bytes decodes as U+FFFD
        excess = n_tokens(prefix) - n
        if excess <= 0:
            return prefix
        take -= excess
    return ""


def prepare_inputs(
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    max_length: int,
    doc_max_length: int,
    skip_instruction: bool,
    model_id: str | None,
    append_eos: bool,
) -> list[EncodingInput]:
    """Tokenise ``(instruction, text)`` pairs exactly like the official library."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None and append_eos:
        raise ValueError("eos_token pooling needs a tokenizer with an EOS token")
    fallback_id = eos_id if eos_id is not None else (tokenizer.bos_token_id or 0)
    joined, heads, pooled_texts, trimmed = [], [], [], set()
    for i, (instruction, text) in enumerate(pairs):
        text, was_trimmed = trim_to_doc_max_length(tokenizer, text, doc_max_length, max_length)
        if was_trimmed:
            trimmed.add(i)
        combined = f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"
        combined = chat_wrap(combined, model_id)
        # the separator inserted above, not one inside the instruction (or, as before, the text)
        start = len((chat_wrapping(model_id) or ("", ""))[0]) + len(instruction.strip())
        at = combined.find(SEPARATOR, start)
        head, pooled = combined[:at], combined[at + len(SEPARATOR) :]
        heads.append(head)
        joined.append(head + pooled)
        pooled_texts.append(pooled)

    budget = max_length - 1 if append_eos else max_length
    batch = tokenizer(joined, add_special_tokens=True, truncation=True, max_length=budget)
    full = batch["input_ids"]
    pooled_ids = tokenizer(pooled_texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
    truncated = _truncated_rows(tokenizer, joined, full, getattr(batch, "encodings", None), budget)
    head_lengths = _head_lengths(tokenizer, heads, truncated) if skip_instruction else {}
    out = []
    for i, (ids, pool) in enumerate(zip(full, pooled_ids)):
        ids = list(ids)
        n_pool = len(pool) if skip_instruction else len(ids)
        if i in head_lengths:  # cut at max_length: the pooled span ends with the input, so keep it out of the head
            n_pool = max(0, min(n_pool, len(ids) - head_lengths[i]))  # nothing of the text left: pooled like an empty text
        if append_eos:
            ids.append(eos_id)
            n_pool += 1
        if not ids:
            ids, n_pool = [fallback_id], 1
        n_pool = min(n_pool, len(ids)) or len(ids)  # empty text: pool every real token
        out.append(EncodingInput(ids, n_pool, i in truncated or i in trimmed))
    return out


def _head_lengths(tokenizer, heads: list[str], rows: set[int]) -> dict[int, int]:
    """Tokens of the instruction part (leading special tokens included) of each row in ``rows``."""
    if not rows:
        return {}
    special = tokenizer("", add_special_tokens=True)["input_ids"]
    leading = len(special) - (1 if special and special[-1] == tokenizer.eos_token_id else 0)
    order = sorted(rows)
    counted = tokenizer([heads[i] for i in order], add_special_tokens=False)["input_ids"]
    return {i: leading + len(ids) for i, ids in zip(order, counted)}


def _truncated_rows(tokenizer, texts: list[str], ids: list[list[int]], encodings, budget: int) -> set[int]:
    """Rows of ``texts`` that truncation to ``budget`` tokens cut. Only rows that reached the budget
    can have been cut. A fast tokenizer's ``Encoding.overflowing`` says so in the same pass, but not
    every transformers / tokenizers release fills it (5.17 / 0.23.2 do not): a row at the budget
    without overflow is tokenized again in full to tell a cut from an exact fit."""
    encodings = encodings or [None] * len(texts)
    at_budget = [i for i, row in enumerate(ids) if len(row) >= budget]
    cut = {i for i in at_budget if encodings[i] is not None and encodings[i].overflowing}
    unsure = [i for i in at_budget if i not in cut]
    if unsure:
        # verbose=False: no "longer than the model's maximum" warning for a length checked on purpose
        whole = tokenizer([texts[i] for i in unsure], add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        cut |= {i for i, row in zip(unsure, whole) if len(row) > budget}
    return cut
