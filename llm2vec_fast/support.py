"""Which model families run bidirectionally on which attention path: the one definition that the
family-matrix tests (``tests/test_family_matrix.py``) iterate over and that generates the support table of
the docs (``python -m llm2vec_fast.support --write-docs``, into ``docs/models.md``), so the two cannot drift.

Paths:

* ``eager`` / ``sdpa`` / ``flex_attention``: the padded batch with transformers' attention
  implementation of that name and our bidirectional padding mask;
* ``packed (triton)`` / ``packed (torch)``: the padding-free varlen path (``LLM2Vec(packed=True)``,
  the default on CUDA) with the Triton kernel or its torch reference;
* ``flash_attention_2/3``: transformers' flash-attention integration with ``is_causal=False``
  (needs the ``flash-attn`` package and a GPU, so it is not in the CPU test matrix).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
FAMILY_NAMES = {
    "llama": "Llama (1/2/3, SmolLM2)",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "phi3": "Phi-3",
}


@dataclass(frozen=True)
class AttentionPath:
    name: str  # column title and test id
    attn_implementation: str  # what the model is loaded with
    packed_backend: str | None = None  # kernel backend of the packed path, None for padded paths
    in_cpu_matrix: bool = True  # covered by tests/test_family_matrix.py


PATHS = (
    AttentionPath("eager", "eager"),
    AttentionPath("sdpa", "sdpa"),
    AttentionPath("flex_attention", "flex_attention"),
    AttentionPath("packed (triton)", "sdpa", packed_backend="triton"),
    AttentionPath("packed (torch)", "sdpa", packed_backend="torch"),
    AttentionPath("flash_attention_2/3", "flash_attention_2", in_cpu_matrix=False),
)

SUPPORTED, NOT_AVAILABLE, UNTESTED = "yes", "n/a", "untested"


@dataclass(frozen=True)
class Cell:
    family: str
    path: AttentionPath
    status: str  # SUPPORTED, NOT_AVAILABLE (transformers has no such implementation), UNTESTED
    note: str = ""

    @property
    def attn_implementation(self) -> str:
        """What the model is loaded with. The packed path switches to ``llm2vec_varlen`` per call and
        falls back to the loaded implementation; Gemma2 has no SDPA in transformers, so eager."""
        if self.path.packed_backend and self.family == "gemma2":
            return "eager"
        return self.path.attn_implementation


def cell(family: str, path: AttentionPath) -> Cell:
    """The support status of one (family, attention path) combination."""
    if family == "gemma2" and path.attn_implementation == "sdpa" and path.packed_backend is None:
        return Cell(family, path, NOT_AVAILABLE, "transformers has no SDPA for Gemma2 (attention soft-capping)")
    if not path.in_cpu_matrix:
        note = "GPU only; not in the CPU test matrix"
        if family in ("mistral", "gemma2"):
            note += "; raises if the config enables a sliding window"
        elif family in ("qwen2", "qwen3", "phi3"):
            note += "; raises if `use_sliding_window` / `sliding_window` is set"
        return Cell(family, path, UNTESTED, note)
    if family == "gemma2" and path.packed_backend is not None:
        return Cell(family, path, SUPPORTED, "kernel applies `softcap`")
    return Cell(family, path, SUPPORTED)


def matrix() -> list[Cell]:
    return [cell(f, p) for f in FAMILIES for p in PATHS]


def tested_cells() -> list[Cell]:
    """The cells the CPU test matrix runs: supported and in the CPU matrix."""
    return [c for c in matrix() if c.status == SUPPORTED and c.path.in_cpu_matrix]


def support_table() -> str:
    """The markdown support table of the docs (``docs/models.md``)."""
    head = "| family | " + " | ".join(f"`{p.name}`" for p in PATHS) + " |"
    rows = [head, "|---" * (len(PATHS) + 1) + "|"]
    notes: dict[str, int] = {}
    for family in FAMILIES:
        cells = []
        for path in PATHS:
            c = cell(family, path)
            text = c.status
            if c.note:
                mark = notes.setdefault(c.note, len(notes) + 1)
                text += f" [{mark}]"
            cells.append(text)
        rows.append(f"| {FAMILY_NAMES[family]} | " + " | ".join(cells) + " |")
    legend = [f"[{i}] {note}" for note, i in notes.items()]
    return "\n".join(rows) + "\n\n" + "<br>\n".join(legend) + "\n"


BEGIN, END = "<!-- support-table:begin (python -m llm2vec_fast.support --write-docs) -->", "<!-- support-table:end -->"


def page_with_table(page: str) -> str:
    """``page`` with the text between the support-table markers replaced by :func:`support_table`."""
    if BEGIN not in page or END not in page:
        raise ValueError(f"the page has no support-table markers {BEGIN!r} ... {END!r}")
    before, rest = page.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{support_table()}{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--write-docs",
        metavar="PATH",
        nargs="?",
        const="docs/models.md",
        help="rewrite the table between the markers of this page (default docs/models.md)",
    )
    args = parser.parse_args(argv)
    if args.write_docs:
        path = Path(args.write_docs)
        path.write_text(page_with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote the support table into {path}")
    else:
        sys.stdout.write(support_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
