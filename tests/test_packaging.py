"""Packaging: one import package; kernels/ and export/ install under llm2vec_fast only; the built
wheel works on its own (console script, every sub-package, encoding with the default encoder's
shipped adapters)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {"llm2vec_fast": "llm2vec_fast", "kernels": "llm2vec_fast.kernels", "export": "llm2vec_fast.export"}


def _run(code: str, cwd: Path) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _source_packages() -> set[str]:
    """Every package the source tree holds, under its installed name."""
    out = set()
    for folder, name in SOURCE_ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                out.add(".".join([name, *rel.parts]))
    return out


def test_subpackages_import_and_no_top_level_modules(tmp_path):
    out = _run(
        "import importlib.util, llm2vec_fast.kernels as k, llm2vec_fast.export as e;"
        "print(*[getattr(importlib.util.find_spec(n), 'origin', None) for n in ('kernels', 'export')], sep='\\n');"
        "print(k.__name__, e.__name__)",
        cwd=tmp_path,  # outside the repo, so the source folders are not on sys.path
    ).splitlines()
    assert out[-1] == "llm2vec_fast.kernels llm2vec_fast.export"
    # transformers >= 5.25 installs Hugging Face's own top-level `kernels`; ours must not be one
    for origin, folder in zip(out[:2], ("kernels", "export")):
        assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT / folder), out


def test_repository_root_on_sys_path_does_not_hide_an_installed_kernels_package(tmp_path):
    """`python -c` / `python -m` in a clone put the root first on sys.path, where kernels/ would shadow
    Hugging Face's `kernels` (which transformers >= 5.25 imports); the installed one must load."""
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("ORIGIN = 'installed'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "import kernels, llm2vec_fast.kernels as ours; print(kernels.ORIGIN, ours.flash_attn_varlen.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["installed", "llm2vec_fast.kernels.flash_attn"]
    # whatever this environment holds, transformers' availability probe for `kernels` imports from here
    probe = "import transformers.modeling_utils, peft; print('ok')"
    assert _run(probe, cwd=ROOT).endswith("ok")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("llm2vec_fast-*.whl"))


def test_wheel_ships_every_package_and_only_llm2vec_fast(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"llm2vec_fast"}
    shipped = {n[: -len("/__init__.py")].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    expected = _source_packages()
    assert {"llm2vec_fast.cli", "llm2vec_fast.train", "llm2vec_fast.kernels", "llm2vec_fast.export"} <= expected
    assert shipped == expected, f"missing {expected - shipped}, unexpected {shipped - expected}"
    modules = {n for n in names if n.endswith(".py")}
    for folder, name in SOURCE_ROOTS.items():
        for src in (ROOT / folder).rglob("*.py"):
            rel = src.relative_to(ROOT / folder)
            assert "/".join([*name.split("."), *rel.parts]) in modules, f"{src} is not in the wheel"
    assert "llm2vec_fast/py.typed" in names
    for stage in ("mntp", "simcse"):  # the default encoder's adapters
        for file in ("adapter_model.safetensors", "adapter_config.json", "train_config.json"):
            assert f"llm2vec_fast/default_adapters/{stage}/{file}" in names
    assert "llm2vec_fast/default_adapters/simcse/llm2vec_config.json" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for line in ("Name: llm2vec-fast", "Requires-Python: >=3.10", "Classifier: Typing :: Typed", "Requires-Dist: transformers"):
        assert line in meta
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "llm2vec-fast = llm2vec_fast.cli:main" in entry


def test_wheel_installs_and_works_in_a_fresh_venv(wheel, tmp_path, default_model_dir):
    """Install the wheel (no editable finder, no source tree on the path) into a new venv whose
    dependencies come from this environment's site-packages through a plain ``.pth`` path line
    (which does not run that folder's own ``.pth`` files, so the editable install stays out)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    (fresh_site / "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = lambda *args: subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731

    r = run(str(venv / "bin" / "llm2vec-fast"), "--help")
    assert r.returncode == 0, r.stderr
    for command in ("encode", "train", "eval", "export", "demo"):
        assert command in r.stdout

    packages = sorted(_source_packages())
    code = (
        "import importlib, llm2vec_fast, sys\n"
        f"for name in {packages!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    assert mod.__file__.startswith(sys.prefix), (name, mod.__file__)\n"
        "from llm2vec_fast import LLM2Vec\n"
        "from llm2vec_fast.default_model import default_adapter_paths\n"
        "enc = LLM2Vec.from_pretrained(device='cpu')  # the default encoder: shipped adapters, merged\n"
        "texts = ['A man is playing a guitar.', 'Someone plays the guitar.', 'The stock market fell sharply.']\n"
        "emb = enc.encode(texts, normalize_embeddings=True)\n"
        "print(llm2vec_fast.__file__, default_adapter_paths()[0], tuple(emb.shape), float(emb[0] @ emb[1]), float(emb[0] @ emb[2]))\n"
    )
    r = run(str(python), "-c", code)
    assert r.returncode == 0, r.stderr
    where, adapters, shape = r.stdout.split()[0], r.stdout.split()[1], r.stdout.split()[2:4]
    paraphrase, unrelated = (float(x) for x in r.stdout.split()[-2:])
    assert where.startswith(str(fresh_site)), f"llm2vec_fast imported from {where}, not from the fresh venv"
    assert adapters.startswith(str(fresh_site)), f"adapters read from {adapters}, not from the installed wheel"
    assert "".join(shape) == "(3,576)" and unrelated + 0.1 < paraphrase <= 1.0 + 1e-6
