"""Every script in examples/ runs as documented (with its small settings), on the default model.

The docs pages include these files verbatim (pymdownx.snippets), so a broken example is a broken page.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (arguments for the small CI run, a line its output must contain)
RUNS = {
    "encode.py": ([], "binary codes: (3, 32)"),
    "train_simcse.py": (["--quick"], "cosine of the first two sentences:"),
    "export_int8.py": (["--quick"], "min cosine int8 vs torch fp32:"),
    "serve_openai.py": ([], "query embedding: 256 dimensions"),
    "encode_parquet.py": (["--quick"], "40 rows -> (40, 576) float16 in 3 shards; first id doc-0"),
}


def test_every_example_is_run():
    assert sorted(RUNS) == sorted(p.name for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script, tmp_path):
    args, expected = RUNS[script]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), TMPDIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the examples run as users run them
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout[-2000:]
