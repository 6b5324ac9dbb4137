"""The support table of the docs (docs/models.md) is generated from llm2vec_fast.support (the matrix the tests run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2vec_fast import support

MODELS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_docs_support_table_matches_the_matrix():
    text = MODELS_PAGE.read_text(encoding="utf-8")
    assert support.page_with_table(text) == text, "docs/models.md support table is stale: run python -m llm2vec_fast.support --write-docs"


def test_table_lists_every_family_and_path():
    table = support.support_table()
    for family in support.FAMILIES:
        assert f"| {support.FAMILY_NAMES[family]} |" in table
    for path in support.PATHS:
        assert f"`{path.name}`" in table


def test_docs_writer_replaces_only_the_table(tmp_path):
    readme = tmp_path / "models.md"
    readme.write_text(f"intro\n{support.BEGIN}\nold table\n{support.END}\noutro\n")
    assert support.main(["--write-docs", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert support.support_table() in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        support.main(["--write-docs", str(readme)])
