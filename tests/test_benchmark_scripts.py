"""The GPU benchmark scripts still run: ``--help`` of each, ``bench_encode.py --cpu-smoke`` end to end
(tiny model on CPU, JSON written), and the suite summary over results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCH_DIR.glob("bench_*.py")) + [BENCH_DIR / "suite_summary.py"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench-results")
    methods = ("--methods", "reference", "packed", "packed-fused", "packed-fused-graphs", "packed-fp8", "packed-fp8-bf16-residual")
    return out, _run(BENCH_DIR / "bench_encode.py", "--cpu-smoke", "--no-plot", "--results-dir", out, *methods)


def test_bench_encode_cpu_smoke(smoke_results):
    out, proc = smoke_results
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "encode-cpu.json").read_text())
    assert data["tokenisation_timed"] is False and "embed_items" in data["timed"]
    rows = data["results"]
    assert [r["method"] for r in rows] == [
        "reference",
        "packed",
        "packed-fused",
        "packed-fused-graphs",
        "packed-fp8",
        "packed-fp8-bf16-residual",
    ]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == rows[0]["tokens"] for r in rows)
    (summary,) = data["summary"]
    assert summary["agree"] and summary["min_cosine"] > 0.999
    assert summary["speedup"] == pytest.approx(rows[0]["seconds"] / rows[1]["seconds"])
    # fused layers (the torch references on CPU) and their padded CUDA-graph buckets (eager on CPU)
    assert summary["fused"]["agree"] and summary["fused"]["min_cosine"] > 0.999999
    assert summary["fused_graphs"]["agree"] and summary["fused_graphs"]["min_cosine"] > 0.999999
    # the fp8 path (simulated on CPU, on the fused model) against the packed one
    assert summary["fp8"]["agree"] and summary["fp8"]["speedup_vs_packed"] == pytest.approx(rows[1]["seconds"] / rows[4]["seconds"])
    # the same FP8 weights over the float32 residual stream (the FP8 default) and over the model's own
    assert summary["fp8"]["fp32_residual_cost"] == pytest.approx(rows[4]["seconds"] / rows[5]["seconds"])


def test_bench_encode_reports_model_flops_utilisation(smoke_results):
    """Model FLOPs per second from the config's FLOP count, as a fraction of the GEMM ceiling measured in the same run."""
    from llm2vec_fast.profiling import encode_flops
    from llm2vec_fast.synthetic import random_config

    out, _ = smoke_results
    data = json.loads((out / "encode-cpu.json").read_text())
    ceiling = data["gemm_ceilings"]["float32"]
    assert ceiling["tflops"] > 0 and ceiling["size"] == 256
    assert data["gemm_ceilings"]["fp8_rowwise"] == {"tflops": None, "unavailable": "the device is cpu, not a CUDA GPU"}
    (summary,) = data["summary"]
    per_token = encode_flops(random_config("tiny"), [summary["tokens"]]) / summary["tokens"] / 1e9
    assert summary["model_gflop_per_token"] < per_token  # several short sequences attend less than one long one
    for r in data["results"]:
        flops = summary["model_gflop_per_token"] * 1e9 * r["tokens"]
        assert r["model_tflops_per_s"] == pytest.approx(flops / r["seconds"] / 1e12)
        if r["method"].startswith("packed-fp8"):
            assert r["precision"] == "fp8_rowwise" and r["mfu"] is None  # no FP8 ceiling on a CPU
        else:
            assert r["precision"] == "float32" and r["mfu"] == pytest.approx(r["model_tflops_per_s"] / ceiling["tflops"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
@pytest.mark.parametrize("script", ["bench_encode.py", "bench_fp8_load.py", "bench_attention.py", "bench_pooling.py"])
def test_gpu_benchmark_without_cuda_fails_with_a_clear_message(script):
    """A GPU benchmark that measured nothing must not pass: in the GPU suite, a card torch cannot see
    would otherwise show the step as ok with no result."""
    proc = _run(BENCH_DIR / script)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stderr


def test_suite_summary(smoke_results, tmp_path):
    out, _ = smoke_results
    (tmp_path / "encode-cpu.json").write_text((out / "encode-cpu.json").read_text())
    (tmp_path / "attention-x.json").write_text(
        json.dumps(
            {
                "environment": {"card": "X"},
                "ratios": [{"shape": "L=512", "fwd_vs_flash": 1.2, "fwd_vs_cudnn": None, "fwd_vs_mask4d": 3.0, "fwd_bwd_vs_flash": 0.9}],
            }
        )
    )
    (tmp_path / "pooling-x.json").write_text(
        json.dumps(
            {
                "environment": {"card": "X"},
                "results": [
                    {"layout": "varlen 3 seqs", "mode": "mean", "method": "triton", "fwd_ms": 1.0, "fwd_vs_copy": 0.8},
                    {"layout": "varlen 3 seqs", "mode": "mean", "method": "torch-ref", "fwd_ms": 4.0, "fwd_vs_copy": 0.2},
                    {"layout": "varlen 3 seqs", "mode": "last", "method": "triton", "fwd_ms": 0.02, "fwd_vs_copy": 0.001},
                    {"layout": "varlen 3 seqs", "mode": "last", "method": "torch-gather", "fwd_ms": 0.01, "fwd_vs_copy": 0.0005},
                ],
            }
        )
    )
    (tmp_path / "train-x.json").write_text(
        json.dumps(
            {
                "device": "X",
                "summary": {"mntp": {"speedup_tokens_per_s": 1.7, "peak_mem_ratio": 0.7}},
                "cases": [{"stage": "simcse", "impl": "ours", "error": "Traceback ...\nRuntimeError: out of time"}],
            }
        )
    )
    proc = _run(BENCH_DIR / "suite_summary.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train mntp tokens/s vs plain HF                    1.70x  target >= 1.5x  ok" in proc.stdout
    assert "train mntp peak memory vs plain HF                 0.70x  target <= 0.6x  MISSED" in proc.stdout
    assert "train simcse ours: ERROR RuntimeError: out of time" in proc.stdout
    assert "attention L=512 fwd_vs_flash" in proc.stdout and "1.20x" in proc.stdout
    assert "pooling varlen mean fwd_vs_torch_ref" in proc.stdout and "4.00x" in proc.stdout
    assert "encode tiny packed vs reference" in proc.stdout and "min cosine" in proc.stdout
    assert "encode tiny fp8 vs bf16 packed" in proc.stdout and "fp8 min cosine" in proc.stdout
    assert "encode tiny packed model FLOPs / float32 ceiling" in proc.stdout
    assert "fwd_vs_cudnn" in proc.stdout and "n/a" in proc.stdout
    # one row per sequence: compared with a plain gather, never judged by copy bandwidth
    assert "pooling varlen last fwd_vs_copy" not in proc.stdout
    assert "pooling varlen last fwd_vs_torch_gather" in proc.stdout and "0.50x  (no target)" in proc.stdout
    assert "20.0 us" in proc.stdout
    mean_line = next(x for x in proc.stdout.splitlines() if "pooling varlen mean fwd_vs_copy" in x)
    assert mean_line.endswith("target >= 0.8x  ok")


def test_suite_summary_judges_the_issue_19_encode_targets(tmp_path):
    """FP8 speed-up per shape against its target, fused paths reported with their cosine, and the
    fastest bf16 packed path's share of the bf16 ceiling judged (FP8 rows never count for it)."""

    def row(method, mfu, precision="bfloat16"):
        return {"shape": "llama-8b", "method": method, "mfu": mfu, "precision": precision}

    agree = {"min_cosine": 0.999, "agree": True}
    data = {
        "environment": {"card": "X"},
        "mfu_targets": {"llama-8b": 0.8, "llama-1b": 0.65},
        "results": [row("packed", 0.70), row("packed-fused", 0.82), row("packed-fp8", 0.95, "fp8_rowwise")],
        "summary": [
            {
                "shape": "llama-8b",
                "notes": {},
                "fused": {"speedup_vs_packed": 1.17, **agree},
                "fp8": {"speedup_vs_packed": 1.3, "target": 1.4, "min_cosine": 0.97, "agree": True},
            }
        ],
    }
    (tmp_path / "fused-encode-x.json").write_text(json.dumps(data))
    proc = _run(BENCH_DIR / "suite_summary.py", tmp_path, "--strict")
    assert proc.returncode == 1, proc.stdout  # FP8 misses 1.4x
    lines = proc.stdout.splitlines()
    assert any(x.endswith("1.30x  target >= 1.4x  MISSED") and "llama-8b fp8 vs bf16 packed" in x for x in lines)
    assert any("llama-8b fused vs bf16 packed" in x and "1.17x  (no target)" in x for x in lines)
    assert any("fused min cosine" in x and x.endswith("ok") for x in lines)
    best = next(x for x in lines if "best bf16 MFU" in x)
    assert "(packed-fused)" in best and "82.0%" in best and best.endswith("target >= 80%  ok")
    data["results"] = [row("packed", 0.70)]
    data["summary"][0]["fp8"]["speedup_vs_packed"] = 1.5
    (tmp_path / "fused-encode-x.json").write_text(json.dumps(data))
    proc = _run(BENCH_DIR / "suite_summary.py", tmp_path, "--strict")
    best = next(x for x in proc.stdout.splitlines() if "best bf16 MFU" in x)
    assert proc.returncode == 1 and best.endswith("70.0%  target >= 80%  MISSED")


def test_bench_first_embedding_cpu_smoke():
    """Two fresh processes (cold and warm Triton cache) time their first embedding; on CPU with the tiny model."""
    proc = _run(BENCH_DIR / "bench_first_embedding.py", "--cpu-smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"cold_over_warm"' in proc.stdout and '"first_embedding_s"' in proc.stdout


def _readme_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", BENCH_DIR / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md", "docs/encoding.md"])
def test_generated_result_tables_match_their_json(tmp_path, page):
    """Every generated block of the page (README: the summary; docs/benchmarks.md: the summary, GPU,
    serve, dataset, int8 GEMM and recipe tables) is exactly what ``readme_results.py`` renders from the JSON."""
    module = _readme_results()
    path = module.ROOT / page
    assert path in module.PAGES
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    module.update_page(copy, module.RESULTS)
    assert copy.read_text() == path.read_text(), f"{page}: result tables drifted: run python benchmarks/readme_results.py"


def test_pages_hold_every_generated_block():
    """The markers the generator fills are on the pages (a deleted marker would silently stop the drift check)."""
    module = _readme_results()
    readme, bench = module.README.read_text(), module.BENCHMARKS_PAGE.read_text()
    assert "<!-- summary:start -->" in readme
    for marker in [*module.TABLES, "gpu-results", "summary"]:
        assert f"<!-- {marker}:start -->" in bench and f"<!-- {marker}:end -->" in bench, marker
    # the README's summary names where and when each row was measured
    summary = readme.split("<!-- summary:start -->")[1].split("<!-- summary:end -->")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| result ")]
    assert len(rows) >= 5 and all(line.rstrip(" |").split("| ")[-1].strip() for line in rows)


def test_gpu_results_render_every_suite_file(smoke_results, tmp_path):
    """One card's GPU block holds the encode table with MFU, the FP8 / fused paths against bf16
    packed with their targets, the training table and the ONNX Runtime line (here: why it did not run)."""
    module = _readme_results()
    out, _ = smoke_results
    encode = json.loads((out / "encode-cpu.json").read_text())
    encode["environment"]["card"] = "Card X"
    results = tmp_path / "results"
    results.mkdir()
    for name in ("encode", "fused-encode"):
        (results / f"{name}-x.json").write_text(json.dumps(encode))
    train = json.loads((module.RESULTS / "train-cpu.json").read_text())
    (results / "train-fused-x.json").write_text(json.dumps({**train, "fused": True}))
    (results / "onnx-cuda-x.json").write_text(json.dumps({"skipped": "onnxruntime 1.30.0 has no CUDAExecutionProvider"}))
    block = module.gpu_results(results)
    assert "| shape | path | model TFLOP/s | MFU |" in block and "GEMM ceilings measured in the same run: " in block
    paths = block[block.index("--methods reference packed packed-fused packed-fused-graphs packed-fp8") :]
    lines = [line for line in paths.splitlines() if line.startswith("| tiny |")]
    assert [line.split(" | ")[1] for line in lines[:5]] == ["reference", "packed", "packed-fused", "packed-fused-graphs", "packed-fp8"]
    assert "| 1.00x |" in lines[1] and all("**" in line for line in lines[2:5])  # each path against bf16 packed
    assert "`bench_train.py --fused 1`" in block and "| mntp | " in block and "(target 1.5x)" in block
    assert "did not run on this card: onnxruntime 1.30.0 has no CUDAExecutionProvider." in block


def test_missing_results_give_notes_never_numbers(tmp_path):
    module = _readme_results()
    text = module.replace_between_markers("a\n<!-- x:start -->\nold\n<!-- x:end -->\nb", "x", "new")
    assert text == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb"
    assert module.replace_between_markers("no markers", "x", "new") == "no markers"
    copy = tmp_path / "benchmarks.md"
    copy.write_text(module.BENCHMARKS_PAGE.read_text())
    empty = tmp_path / "results"
    empty.mkdir()
    module.update_page(copy, empty)
    text = copy.read_text()
    assert "no `benchmarks/results/serve-cpu.json` yet" in text and "no `benchmarks/results/recipe_sts.json` yet" in text
    assert "(no results yet" in text.split("<!-- summary:start -->")[1]


def test_onnx_tables_match_their_json(tmp_path):
    """The ONNX Runtime tables of docs/benchmarks.md are exactly what ``bench_onnx.py --docs`` renders."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_onnx", BENCH_DIR / "bench_onnx.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    page = bench.BENCHMARKS_PAGE.read_text()
    for marker in bench.TABLES.values():
        assert f"<!-- {marker}:start -->" in page, marker
    copy = tmp_path / "benchmarks.md"
    copy.write_text(page)
    bench.update_docs(copy, bench.RESULTS)
    assert copy.read_text() == page, "docs/benchmarks.md ONNX tables drifted: run python benchmarks/bench_onnx.py --docs"


def test_gpu_suite_skips_the_fp8_step_without_its_minimum_budget(tmp_path):
    """Budget-aware: with less than FP8_MIN_S seconds of the suite budget left the FP8 encode step is
    skipped (and reported), the other steps still start. Every command is `true` (no GPU needed)."""
    env = {**os.environ, "PYTHON": "true", "SUITE_BUDGET_S": "50", "FP8_MIN_S": "60", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_suite.sh")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1  # a skipped step is a failed suite
    assert "bench-encode-fp8: skipped (" in proc.stdout and "needs 60s)" in proc.stdout
    for name in ("install", "bench-encode", "bench-attention", "kernel-tests"):
        assert f"{name}: ok (" in proc.stdout, name
    assert "=== bench-encode-fp8" not in proc.stdout
    env["SUITE_BUDGET_S"], env["OUT"] = "480", str(tmp_path / "second")
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_suite.sh")], capture_output=True, text=True, timeout=120, env=env)
    assert "bench-encode-fp8: ok (" in proc.stdout
    assert "--methods packed packed-fp8 --name fp8-encode" in proc.stdout
    # it prints what it will run and its budget before running anything
    plan = proc.stdout[proc.stdout.index("=== plan: ") : proc.stdout.index("=== bench-encode (")]
    assert "of the 480s budget left" in plan
    assert "  bench-encode-fp8: cap 90s, starts only with 60s of the budget left: " in plan
    assert "  kernel-tests: cap 130s: " in plan and "  onnx-cuda: cap 90s: " in plan
    assert proc.stdout.count("=== kernel-tests (") == 1


def test_gpu_followup_runs_fused_fp8_and_fused_training(tmp_path):
    """The second GPU call: FP8 of the fused model and bench_train with fused layers, each a capped step,
    then the summary and the $OUT packing. Every command is `true` (no GPU needed)."""
    env = {**os.environ, "PYTHON": "true", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_followup.sh")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("install", "bench-encode-fp8-fused", "bench-train-fused", "bench-fp8-load"):
        assert f"{name}: ok (" in proc.stdout, name
    assert (
        "--methods packed packed-fused packed-fp8 packed-fp8-bf16-residual --shapes llama-1b llama-8b --name fp8-fused-encode"
        in proc.stdout
    )
    assert "benchmarks/bench_train.py --quick --fused 1" in proc.stdout
    # at most 8 files come back from a device call: archives and the two summaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs_and_plots.tar.gz", "results.tar.gz", "steps.txt", "summary.txt"]
    env["FOLLOWUP_BUDGET_S"], env["OUT"] = "10", str(tmp_path / "second")
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_followup.sh")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "bench-fp8-load: skipped (" in proc.stdout


_READ_ONLY_PYTHON = """#!/usr/bin/env bash
# a GPU image whose python3 cannot pip install into its own environment; llm2vec_fast imports only
# from the working tree once the suite links kernels/ and export/ and puts the tree on PYTHONPATH
if [ "$1 $2 $3" = "-m pip install" ] && [[ " $* " != *" --target "* ]]; then exit 1; fi
if [ "$1" = -c ] && [[ "$2" == *"import llm2vec_fast"* ]]; then
    [ -n "${WORKING_TREE_IMPORTS:-}" ] && [ -L llm2vec_fast/kernels ] && [ -L llm2vec_fast/export ] \\
        && [[ ":$PYTHONPATH:" == *":$PWD:"* ]]
    exit $?
fi
exit 0
"""


@pytest.mark.parametrize("imports", [True, False], ids=["tree-imports", "nothing-imports"])
def test_gpu_suite_on_a_read_only_image_imports_the_working_tree(tmp_path, imports):
    """On an image where pip cannot install (calls have run as a non-root user), the suite imports the
    working tree instead: that is not a failed suite; a tree that does not import either is."""
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    for name in ("gpu_suite.sh", "gpu_steps.sh"):
        (tree / "benchmarks" / name).write_text((BENCH_DIR / name).read_text())
    for folder in ("llm2vec_fast", "kernels", "export"):
        (tree / folder).mkdir()
    python = tmp_path / "python3"
    python.write_text(_READ_ONLY_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "OUT": str(tmp_path / "out"), "PYTHONPATH": ""}
    env["WORKING_TREE_IMPORTS"] = "1" if imports else ""
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True, timeout=120, env=env)
    steps = (tmp_path / "out" / "steps.txt").read_text()
    if imports:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert steps.startswith("install: not installed (read-only environment?), llm2vec_fast imported from the working tree\n")
        assert "FAILED" not in steps and "kernel-tests: ok (" in steps
    else:
        assert proc.returncode == 1
        assert "install: FAILED rc=1" in steps and "llm2vec_fast imports neither installed nor from the working tree" in steps
    assert (tree / "llm2vec_fast" / "kernels").is_symlink()


def test_bench_onnx_cuda_cpu_smoke(tmp_path):
    """The fp16 export of random weights against torch on the same inputs, timed with its spread and
    checked by cosine; on CPU (CPU provider, tiny model) as a check of the script."""
    proc = _run(BENCH_DIR / "bench_onnx_cuda.py", "--cpu-smoke", "--results-dir", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "onnx-cuda-cpu.json").read_text())
    assert data["shape"] == "tiny" and data["tokens"] > data["inputs"] == 12
    assert [r["method"] for r in data["results"]] == ["torch-packed", "onnx-cuda-fp16"]
    for r in data["results"]:
        assert r["min_seconds"] <= r["seconds"] <= r["max_seconds"] and r["tokens_per_s"] > 0
    assert data["summary"]["agree"] and data["summary"]["min_cosine"] > 0.99
    assert data["summary"]["onnx_vs_torch_tokens_per_s"] > 0


def test_bench_onnx_cuda_says_why_it_skipped(tmp_path):
    """Without ONNX Runtime's CUDA provider (this CPU machine, the GPU image's plain wheel) nothing is
    exported: the JSON records the reason and the suite summary prints it."""
    proc = _run(BENCH_DIR / "bench_onnx_cuda.py", "--results-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "onnx-cuda-cpu.json").read_text())
    assert "CUDAExecutionProvider" in data["skipped"] and "results" not in data
    proc = _run(BENCH_DIR / "suite_summary.py", tmp_path)
    assert "onnx-cuda skipped: onnxruntime" in proc.stdout and "onnxruntime-gpu" in proc.stdout


def test_bench_fp8_load_cpu_smoke(tmp_path):
    """Each way of loading FP8 (nearest, GPTQ, GPTQ + calibration) on a fresh model, timed, with what
    it chose; on CPU with the simulated scheme as a check of the script."""
    proc = _run(BENCH_DIR / "bench_fp8_load.py", "--cpu-smoke", "--results-dir", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "fp8-load-cpu.json").read_text())
    assert data["scheme"] == "fp8-simulated" and list(data["variants"]) == ["nearest", "gptq", "default"]
    nearest, gptq, default = data["variants"].values()
    assert nearest["gptq_seconds"] is None and gptq["gptq_seconds"] > 0 and default["gptq_seconds"] > 0
    assert nearest["fp8_linears"] == gptq["fp8_linears"] == nearest["linears"] == 14
    assert all(v["seconds"] > 0 for v in data["variants"].values())
    (tmp_path / "fp8-load-x.json").write_text(json.dumps(data))
    proc = _run(BENCH_DIR / "suite_summary.py", tmp_path)
    assert "fp8 load tiny default" in proc.stdout and "14/14 linears FP8" in proc.stdout
    line = _readme_results().fp8_load_gpu_line(data)
    assert "GPTQ + layer calibration (the default) **" in line and "16 GPTQ inputs, 12 calibration inputs" in line


def test_bench_fp8_fidelity_on_a_tiny_model(tiny_llama_dir, tmp_path):
    """Every variant (default GPTQ + calibration, nearest, both on every layer) runs and is reported
    against fp32 next to bf16, with the issue's checks; on the repo's small STS-B copy."""
    data = Path(__file__).resolve().parent / "data" / "stsbenchmark"
    args = ("--model", tiny_llama_dir, "--pairs", "8", "--calibration-inputs", "12", "--gptq-inputs", "16")
    proc = _run(BENCH_DIR / "bench_fp8_fidelity.py", *args, "--data-dir", data, "--results-dir", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "fp8-fidelity-cpu.json").read_text())
    variants = result["variants"]
    assert list(variants) == [
        "bf16",
        "bf16-fp32-residual",
        "fp8",
        "fp8-bf16-residual",
        "fp8-nearest",
        "fp8-all-layers",
        "fp8-nearest-all-layers",
    ]
    # FP8 quantizes a bf16 model, as on a GPU (an fp32 model around the GEMMs flatters FP8 against bf16),
    # with the float32 residual stream FP8 loads with by default
    assert result["fp8_model_dtype"] == "bfloat16"
    assert {v["model_dtype"] for v in variants.values()} == {"bfloat16"}
    narrow = {"bf16", "fp8-bf16-residual"}
    assert {name: v["residual_dtype"] for name, v in variants.items()} == {n: "bfloat16" if n in narrow else "float32" for n in variants}
    for name, rounding in (
        ("fp8", "gptq"),
        ("fp8-bf16-residual", "gptq"),
        ("fp8-nearest", "nearest"),
        ("fp8-all-layers", "gptq"),
        ("fp8-nearest-all-layers", "nearest"),
    ):
        report = variants[name]["report"]
        assert report["rounding"] == rounding and ("calibration" in report) == (not name.endswith("all-layers"))
        assert 0.9 < variants[name]["all"]["worst_cos"] <= variants[name]["all"]["mean_cos"] < 1.0
    assert variants["fp8-all-layers"]["report"]["fp8_linears"] == variants["fp8-all-layers"]["report"]["linears"] == 14
    assert set(result["checks"]) == {"mean cos >= 0.99", "worst cos >= bf16 worst", "worst cos >= 0.95", "STS-B drop vs bf16 <= 0.5"}
    # the CPU is named (bf16 is emulated where it has no bf16 instructions) and the docs' table is printed
    assert result["cpu"] and isinstance(result["cpu_flags"], list)
    assert "| **FP8, default** (GPTQ, calibrated) | float32 |" in proc.stdout
