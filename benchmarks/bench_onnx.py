"""CPU benchmark of the ONNX exports against torch fp32 ``LLM2Vec.encode``, with a checked baseline.

For torch fp32, torch bf16 (int8's fidelity bar), each ONNX precision under ONNX Runtime and,
when ``openvino`` is installed, the same folders under OpenVINO (f32 inference, plus the fp32
graph with bf16 inference on a CPU with bf16 instructions): sentences/s (``--threads`` threads, batch 32, STS-B dev
sentences), the median of interleaved rounds and the spread of the per-round speed-up, mean / min
cosine to torch fp32 on held-out plain sentences and on ``[instruction, text]`` pairs, STS-B dev
Spearman, size on disk and export time. The ``int8-openvino`` precision runs under OpenVINO only
(it is made for it). Each engine runs in its own process and the engines take turns batch by
batch (``isolated_engines``), so neither another engine's spinning threads nor the machine's
changing speed favours one of them.

    OMP_NUM_THREADS=2 python benchmarks/bench_onnx.py                      # default model
    OMP_NUM_THREADS=2 python benchmarks/bench_onnx.py --peft MNTP --peft SIMCSE --precisions int8
    OMP_NUM_THREADS=2 python benchmarks/bench_onnx.py --precisions int8,int8-openvino --output benchmarks/results/onnx-cpu-trained.json
    OMP_NUM_THREADS=2 python benchmarks/bench_onnx.py --precisions int8-openvino --openvino-group-size 64 --int8-fp32-layers 3 \
        --output benchmarks/results/onnx-cpu-trained-openvino-group64-fp32layers3.json  # an int8-openvino variant
    python benchmarks/bench_onnx.py --docs                                 # docs tables from the JSON
    python benchmarks/bench_onnx.py --quick --force                        # smoke test, writes nothing

The torch baseline is measured the way users run it (``LLM2Vec.encode``, same threads, same
batches) and checked against a plain forward of the same transformers model on the same padded
batches; the script refuses to write results when the two differ by more than 1.5x or when the
machine is busy (1-minute load average above ``cpus - threads + 0.5`` before the run, or above
``cpus + 0.5`` during it). ``--force`` runs anyway for smoke tests and writes nothing under
``benchmarks/results``. Results: ``benchmarks/results/onnx-cpu.json`` (``onnx-cpu-trained.json``
with ``--peft``) + ``.png``; the tables between the ``bench_onnx`` markers of ``docs/benchmarks.md``
are regenerated from those files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path (tests)
from common import model_description  # noqa: E402
from isolated_engines import EngineProcess, EngineSpec, plain_forward, time_in_turns  # noqa: E402,F401
from llm2vec_fast.export.cpu_int8 import BF16_GEMM_FLAGS, cpu_flags, cpu_name, int8_weight_bits  # noqa: E402,F401  (bench_int8_gemm imports cpu_flags and cpu_name from here)
from llm2vec_fast.export.exporter import DEFAULT_OPENVINO_FP32_LAYERS, DEFAULT_ROUNDINGS  # noqa: E402
from llm2vec_fast.export.onnx_encoder import UNRECORDED_OPENVINO_GROUP_SIZE  # noqa: E402
from llm2vec_fast.export.openvino_runtime import ACTIVATION_GROUP_SIZES, DYNAMIC_QUANTIZATION_GROUP_SIZE  # noqa: E402
from portable_paths import portable_argv  # noqa: E402
from readme_results import replace_between_markers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
MAX_BASELINE_RATIO = 1.5
# Each engine runs in its own process (isolated_engines); the pause lets the previous engine's
# threads stop spin-waiting before the next one starts.
ENGINE_PAUSE_S = 0.25
TABLES = {"onnx-cpu.json": "bench_onnx", "onnx-cpu-trained.json": "bench_onnx_trained"}
INSTRUCTIONS = (
    "Retrieve semantically similar text:",
    "Given a question, retrieve passages that answer it",
    "Represent the sentence for clustering",
)


def held_out_inputs(sentences: int, dev: list | None = None) -> tuple[list[str], list[list[str]]]:
    """The held-out text the benchmark scores: ``sentences`` STS-B dev sentences after the pairs
    export validation reads (``dev[:200]``), and ``[instruction, text]`` pairs of the first half
    of them (at least 8)."""
    from llm2vec_fast.stsb import load_stsb

    dev = load_stsb("dev") if dev is None else dev
    texts = list(dict.fromkeys(s for a, b, _ in dev[200:] for s in (a, b)))[:sentences]
    pairs = [[INSTRUCTIONS[i % len(INSTRUCTIONS)], s] for i, s in enumerate(texts[: max(sentences // 2, 8)])]
    return texts, pairs


class BusyMachineError(RuntimeError):
    pass


def check_load(threads: int, running: bool) -> float:
    """The 1-minute load average; raises :class:`BusyMachineError` when other work competes for
    the cores (before the run: more than ``cpus - threads + 0.5``; during it, where our own
    threads count too: more than ``cpus + 0.5``)."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    limit = cpus + 0.5 if running else max(cpus - threads, 0) + 0.5
    if load > limit:
        raise BusyMachineError(
            f"load average {load:.2f} > {limit:.1f} ({cpus} CPUs, {threads} threads): the machine is busy, "
            "timings would be meaningless. Run it on a quiet machine (or --force for a smoke test that writes nothing)."
        )
    return load


def wait_for_quiet(threads: int, seconds: float) -> float:
    """Wait up to ``seconds`` for the load average to settle (a previous command's load decays
    over a minute), then :func:`check_load` once more."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return check_load(threads, running=False)
        except BusyMachineError:
            time.sleep(10)
    return check_load(threads, running=False)


def export_seconds(folder: Path) -> float | None:
    try:
        report = json.loads((folder / "export_report.json").read_text())
    except (OSError, ValueError):
        return None
    return round(report.get("export_s", 0) + report.get("convert_s", 0), 1)


def export_facts(folder: Path) -> dict:
    """What an int8 export chose: weight bits and rounding, layers in int8 (from its report)."""
    try:
        q = json.loads((folder / "export_report.json").read_text()).get("quantization") or {}
    except (OSError, ValueError):
        return {}
    keys = {
        "weight_bits": "int8_weight_bits",
        "weight_rounding": "int8_weight_rounding",
        "int8_layers": "int8_layers",
        "activation_group_size": "openvino_activation_group_size",
    }
    out = {new: q[old] for old, new in keys.items() if old in q}
    if "int8_layers" in out:
        out["int8_layers"] = len(out["int8_layers"])
        out["layers"] = len(q.get("layer_sensitivity", [])) or q.get("decoder_layers")
    return out


def check_reused_openvino_export(folder: Path, options: dict) -> None:
    """Refuse to time an int8-openvino folder from ``--export-dir`` made with other options than asked."""
    q = json.loads((folder / "export_report.json").read_text()).get("quantization") or {}
    made = {
        "activation_group_size": q.get("activation_group_size", UNRECORDED_OPENVINO_GROUP_SIZE),
        "fp32_layers": q.get("fp32_layers_asked", 0),
        "rounding": "gptq" if str(q.get("weight_rounding", "nearest")).startswith("GPTQ") else "nearest",
        "weight_bits": q.get("weight_bits"),
    }
    asked = {
        "activation_group_size": options["activation_group_size"] or DYNAMIC_QUANTIZATION_GROUP_SIZE,
        "fp32_layers": DEFAULT_OPENVINO_FP32_LAYERS if options["fp32_layers"] is None else options["fp32_layers"],
        "rounding": options.get("rounding") or DEFAULT_ROUNDINGS["int8-openvino"],
        "weight_bits": int8_weight_bits(options.get("weights") or "auto", runtime="openvino"),
    }
    if made != asked:
        raise SystemExit(f"bench_onnx: {folder} was exported with {made}, not {asked}: delete it or pick another --export-dir")


def int8_gemm_ceiling(cpu: str, flags: list[str] | None = None, results: Path = RESULTS) -> dict | None:
    """bench_int8_gemm.py's int8-vs-fp32 GEMM speed-ups on this CPU: the first
    ``int8-gemm-cpu*.json`` measured on a CPU of this name and these int8 flags."""
    for path in sorted(results.glob("int8-gemm-cpu*.json")):
        try:
            gemm = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if gemm.get("cpu") == cpu and (flags is None or sorted(gemm.get("cpu_flags") or []) == sorted(flags)):
            return {"file": f"benchmarks/results/{path.name}", "threads": gemm.get("threads"), "rows": gemm.get("rows")}
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--peft", action="append", default=None, metavar="ADAPTER", help="LoRA adapter (repeat to chain; merged)")
    parser.add_argument("--precisions", default="fp32,fp16,int8,int4", help="comma-separated ONNX precisions")
    parser.add_argument("--sentences", type=int, default=256, help="STS-B dev sentences timed per engine and round")
    parser.add_argument("--stsb-pairs", type=int, default=1500, help="STS-B dev pairs for Spearman (all of dev: 1500)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--export-dir", type=Path, default=None, help="reuse / keep the exports here")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/onnx-cpu[-trained].json)")
    parser.add_argument("--wait", type=float, default=120, help="seconds to wait for a quiet machine before refusing")
    parser.add_argument("--quick", action="store_true", help="64 sentences, 2 rounds, 100 STS-B pairs, int8 only")
    parser.add_argument(
        "--force", action="store_true", help="run on a busy machine / odd baseline; smoke test: writes nothing to benchmarks/results"
    )
    parser.add_argument(
        "--int8-weights", choices=("7bit", "auto", "8bit"), default=None, help="int8 export weights (as llm2vec-fast export)"
    )
    parser.add_argument(
        "--int8-rounding", choices=("nearest", "gptq"), default=None, help="int8 export weight rounding (default: the precision's)"
    )
    parser.add_argument(
        "--openvino-group-size",
        type=int,
        choices=ACTIVATION_GROUP_SIZES,
        default=None,
        help="int8-openvino export (as llm2vec-fast export)",
    )
    parser.add_argument("--int8-fp32-layers", type=int, default=None, metavar="N", help="int8-openvino export (as llm2vec-fast export)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the torch bf16 row (int8's fidelity bar)")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO rows (run when openvino is installed)")
    parser.add_argument("--docs", action="store_true", help="only regenerate the docs tables (docs/benchmarks.md) from the JSON files")
    args = parser.parse_args(argv)
    if args.docs:
        update_docs()
        return 0
    if args.quick:
        args.sentences, args.rounds, args.stsb_pairs = 64, 2, 100
        if args.precisions == parser.get_default("precisions"):
            args.precisions = "int8"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    try:
        result = run(args)
    except BusyMachineError as err:
        print(f"bench_onnx: {err}", file=sys.stderr)
        return 3
    if args.force:
        out = Path(tempfile.mkdtemp(prefix="bench-onnx-force-")) / "onnx-cpu.json"
        print(f"--force: results are not written to benchmarks/results (smoke run); see {out}", file=sys.stderr)
    else:
        out = args.output or RESULTS / ("onnx-cpu-trained.json" if args.peft else "onnx-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    if not args.force and out.parent.resolve() == RESULTS.resolve():
        update_docs()
    print(render_table(result))
    return 0


def run(args) -> dict:
    import torch
    from llm2vec_fast.export import Int8Options, OnnxEncoder, ValidationConfig, export_onnx
    from llm2vec_fast.export.calibrate import bf16_copy, cosine_rows
    from llm2vec_fast.export.precisions import check_precision, precision_runtime

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.stsb import load_stsb, stsb_spearman

    precisions = [check_precision(p.strip()) for p in args.precisions.split(",") if p.strip()]
    if not args.force:
        wait_for_quiet(args.threads, args.wait)
    torch.set_num_threads(args.threads)
    encoder = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft, merge_peft=True, dtype="float32", device="cpu")
    dev = load_stsb("dev")
    texts, pairs = held_out_inputs(args.sentences, dev)

    export_root = args.export_dir or Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    model = str(args.model) if args.model else None
    peft = tuple(args.peft) if args.peft else None
    specs = {
        "torch-fp32": EngineSpec("torch", model, peft),
        "torch-plain-forward": EngineSpec("torch-plain-forward", model, peft),
    }
    if not args.no_bf16:  # the fidelity bar of int8 (precisions.int8_min_cos), timed alongside
        specs["torch-bf16"] = EngineSpec("torch-bf16", model, peft)
    folders: dict = {}
    onnx_engines: dict = {}  # engine name -> (export precision, runtime, inference precision)
    openvino = not args.no_openvino and importlib.util.find_spec("openvino") is not None
    if "int8-openvino" in precisions and not openvino:
        raise SystemExit("bench_onnx: --precisions int8-openvino needs OpenVINO (pip install llm2vec-fast[openvino])")
    openvino_options = {
        "activation_group_size": args.openvino_group_size,
        "fp32_layers": args.int8_fp32_layers,
        "rounding": args.int8_rounding,
    }
    for p in precisions:
        folder = folders[p] = export_root / p
        if p == "int8-openvino" and (folder / "model.onnx").is_file():
            check_reused_openvino_export(folder, {**openvino_options, "weights": args.int8_weights})
        if not (folder / "model.onnx").is_file():
            print(f"exporting {p} -> {folder}", file=sys.stderr)
            int8 = Int8Options(
                weights=args.int8_weights, **(openvino_options if p == "int8-openvino" else {"rounding": args.int8_rounding})
            )
            export_onnx(encoder, folder, precision=p, validate=ValidationConfig(stsb_pairs=0), overwrite=True, int8=int8)
        if precision_runtime(p) == "onnxruntime":  # int8-openvino is made for OpenVINO only
            onnx_engines[f"onnx-{p}"] = (p, "onnxruntime", None)
    if openvino:  # the same folders under OpenVINO (f32 inference: the graph's precision)
        for p in precisions:
            onnx_engines[f"openvino-{p}"] = (p, "openvino", None)
        if "fp32" in precisions and set(BF16_GEMM_FLAGS) & set(cpu_flags()):  # its CPU default where the CPU has bf16
            onnx_engines["openvino-fp32-bf16-inference"] = ("fp32", "openvino", "bf16")
    for name, (p, runtime, inference) in onnx_engines.items():
        specs[name] = EngineSpec("onnx", folder=str(folders[p]), runtime=runtime, inference_precision=inference)

    # every engine gets the same batches: the texts sorted by length, as encode() batches them
    by_length = sorted(texts, key=lambda t: -len(encoder.tokenizer(t)["input_ids"]))
    batches = [by_length[i : i + args.batch_size] for i in range(0, len(by_length), args.batch_size)]
    processes: dict = {}
    loads = []

    def check_round(r: int) -> None:
        loads.append(os.getloadavg()[0] if args.force else check_load(args.threads, running=True))

    try:
        for name, spec in specs.items():
            processes[name] = EngineProcess(name, spec, args.threads, batches[0], args.batch_size)
        seconds = time_in_turns(processes, batches, args.batch_size, args.rounds, ENGINE_PAUSE_S, check_round)
    finally:
        for process in processes.values():
            process.close()
    names = list(specs)
    baseline_ratio = statistics.median(seconds["torch-fp32"]) / statistics.median(seconds["torch-plain-forward"])
    baseline_ok = 1 / MAX_BASELINE_RATIO <= baseline_ratio <= MAX_BASELINE_RATIO
    if not baseline_ok and not args.force:
        raise BusyMachineError(
            f"torch baseline check failed: LLM2Vec.encode takes {baseline_ratio:.2f}x the time of a plain forward "
            f"of the same model on the same batches (allowed 1/{MAX_BASELINE_RATIO}..{MAX_BASELINE_RATIO}x)"
        )

    # fidelity, untimed, in this process
    engines = {"torch-fp32": lambda t, bs: encoder.encode(t, batch_size=bs, convert_to_numpy=True)}
    if not args.no_bf16:
        bf16_encoder = bf16_copy(encoder)
        engines["torch-bf16"] = lambda t, bs: bf16_encoder.encode(t, batch_size=bs, convert_to_numpy=True)
    runners = {}
    for name, (p, runtime, inference) in onnx_engines.items():
        kwargs = {"inference_precision": inference} if inference else {}
        runners[name] = (OnnxEncoder.from_pretrained(folders[p], num_threads=args.threads, runtime=runtime, **kwargs), p)
    reference = engines["torch-fp32"](texts, args.batch_size)
    reference_pairs = engines["torch-fp32"](pairs, args.batch_size)
    stsb_reference = stsb_spearman(encoder, "dev", args.stsb_pairs, batch_size=args.batch_size)
    rows = []
    for name in names:
        if name == "torch-plain-forward":
            continue
        per_round = [t / s for t, s in zip(seconds["torch-fp32"], seconds[name])]
        row = {
            "engine": name,
            "sentences_per_s": round(len(texts) / statistics.median(seconds[name]), 2),
            "speedup_vs_torch_fp32": round(statistics.median(per_round), 3),
            "speedup_min": round(min(per_round), 3),
            "speedup_max": round(max(per_round), 3),
            "seconds_per_round": [round(s, 3) for s in seconds[name]],
        }
        if name == "torch-fp32":
            row.update(mean_cos=1.0, min_cos=1.0, min_cos_instructions=1.0, stsb_dev_spearman=round(stsb_reference, 2))
        elif name == "torch-bf16":
            cos = cosine_rows(engines[name](texts, args.batch_size), reference)
            cos_pairs = cosine_rows(engines[name](pairs, args.batch_size), reference_pairs)
            spearman = stsb_spearman(bf16_encoder, "dev", args.stsb_pairs, batch_size=args.batch_size)
            row.update(
                mean_cos=round(float(np.concatenate([cos, cos_pairs]).mean()), 6),
                min_cos=round(float(cos.min()), 6),
                min_cos_instructions=round(float(cos_pairs.min()), 6),
                stsb_dev_spearman=round(spearman, 2),
                stsb_drop=round(stsb_reference - spearman, 2),
            )
        else:
            onnx_encoder, p = runners[name]
            cos = cosine_rows(onnx_encoder.encode(texts, batch_size=args.batch_size, convert_to_numpy=True), reference)
            cos_pairs = cosine_rows(onnx_encoder.encode(pairs, batch_size=args.batch_size, convert_to_numpy=True), reference_pairs)
            both = np.concatenate([cos, cos_pairs])
            size = sum((folders[p] / f).stat().st_size for f in ("model.onnx", "model.onnx.data") if (folders[p] / f).exists())
            spearman = stsb_spearman(onnx_encoder, "dev", args.stsb_pairs, batch_size=args.batch_size)
            row.update(
                mean_cos=round(float(both.mean()), 6),
                min_cos=round(float(cos.min()), 6),
                min_cos_instructions=round(float(cos_pairs.min()), 6),
                stsb_dev_spearman=round(spearman, 2),
                stsb_drop=round(stsb_reference - spearman, 2),
                size_mb=round(size / 1e6, 1),
                export_s=export_seconds(folders[p]),
                **export_facts(folders[p]),
            )
        rows.append(row)

    import onnxruntime

    return {
        "model": model_description(args.model, args.peft),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "int8_gemm_ceiling": int8_gemm_ceiling(cpu_name(), cpu_flags()),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "sentences": len(texts),
        "instruction_pairs": len(pairs),
        "stsb_pairs": args.stsb_pairs,
        "rounds": args.rounds,
        "timing": (
            f"each engine in its own process; in each round every engine runs each batch in turn (order rotated per batch and round, "
            f"{ENGINE_PAUSE_S} s pause before each call); a round's time is the sum over the batches; "
            "sentences/s from the median round; speed-up = median of per-round ratios, min..max = spread"
        ),
        "load_average_per_round": [round(x, 2) for x in loads],
        "baseline_check": {
            "encode_s_over_plain_forward_s": round(baseline_ratio, 3),
            "plain_forward_sentences_per_s": round(len(texts) / statistics.median(seconds["torch-plain-forward"]), 2),
            "ok": baseline_ok,
        },
        "forced": bool(args.force),
        "argv": portable_argv(sys.argv[1:]) if argv_is_cli() else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino_version()},
        "results": rows,
    }


def openvino_version() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino

    return openvino.__version__


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name == "bench_onnx.py"


# ------------------------------------------------------------------------------------ reporting
def render_table(result: dict) -> str:
    """The docs table of one results JSON."""
    lines = [
        f"{result['model']}; {result['cpu']} ({', '.join(result.get('cpu_flags', [])) or 'no AVX2'}), "
        f"{result['threads']} threads, batch {result['batch_size']}, {result['sentences']} STS-B dev sentences, "
        f"median of {result['rounds']} interleaved rounds (load average {min(result['load_average_per_round'])}"
        f"-{max(result['load_average_per_round'])}); baseline encode/plain-forward time "
        f"{result['baseline_check']['encode_s_over_plain_forward_s']}x; {result['date']}.",
        "",
        "| engine | sentences/s | vs torch fp32 (spread) | mean cos | min cos (plain / instr.) | STS-B dev (drop) | size | export |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        torch_row = r["engine"] == "torch-fp32"
        no_file = r["engine"].startswith("torch-")
        lines.append(
            "| {engine} | {sps:.1f} | {sp:.2f}x ({lo:.2f}-{hi:.2f}) | {mean} | {mins} | {stsb}{drop} | {size} | {exp} |".format(
                engine=r["engine"],
                sps=r["sentences_per_s"],
                sp=r["speedup_vs_torch_fp32"],
                lo=r["speedup_min"],
                hi=r["speedup_max"],
                mean="1" if torch_row else f"{r['mean_cos']:.4f}",
                mins="1" if torch_row else f"{r['min_cos']:.4f} / {r['min_cos_instructions']:.4f}",
                stsb=f"{r['stsb_dev_spearman']:.2f}",
                drop="" if torch_row else f" ({r['stsb_drop']:+.2f})",
                size="-" if no_file else f"{r['size_mb']:.0f} MB",
                exp="-" if no_file or r.get("export_s") is None else f"{r['export_s']:.0f} s",
            )
        )
    for r in result["results"]:
        if r.get("int8_layers") is not None:
            lines.append(
                f"\n{r['engine']}: {r['int8_layers']} of {r.get('layers') or '?'} decoder layers in int8, "
                f"{r.get('int8_weight_bits', 7)}-bit weights ({r.get('int8_weight_rounding', 'nearest')} rounding)"
                + (
                    f", activations in groups of {r['openvino_activation_group_size']} channels."
                    if r.get("openvino_activation_group_size")
                    else "."
                )
            )
    by_engine = {r["engine"]: r for r in result["results"]}
    if "onnx-fp32" in by_engine:  # a second fp32 baseline: torch's CPU GEMM library may not use all of the CPU
        fp32 = by_engine["onnx-fp32"]["sentences_per_s"]
        others = [f"{r['engine']} {r['sentences_per_s'] / fp32:.2f}x" for r in result["results"] if r["engine"] != "onnx-fp32"]
        lines.append(f"\nvs ONNX Runtime fp32 (median rounds, same run): {', '.join(others)}.")
    ceiling = result.get("int8_gemm_ceiling")
    if ceiling and ceiling.get("rows"):
        best = max(x.get("MatMulIntegerToFloat_speedup", 0) for x in ceiling["rows"])
        worst = min(x.get("MatMulIntegerToFloat_speedup", 0) for x in ceiling["rows"])
        lines.append(f"\nint8 GEMM ceiling on this CPU (bench_int8_gemm.py, MatMulIntegerToFloat vs fp32 MatMul): {worst:.1f}-{best:.1f}x.")
    return "\n".join(lines)


def update_docs(page: Path = BENCHMARKS_PAGE, results: Path = RESULTS) -> None:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in the docs page
    with the table rendered from each results JSON (a missing JSON leaves a note)."""
    text = page.read_text()
    for file, marker in TABLES.items():
        path = results / file
        body = (
            render_table(json.loads(path.read_text()))
            if path.is_file()
            else f"(no `{path.relative_to(results.parent.parent)}` yet: run the command above)"
        )
        text = replace_between_markers(text, marker, body)
    page.write_text(text)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    names = [r["engine"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    speed = [r["speedup_vs_torch_fp32"] for r in rows]
    err = [[s - r["speedup_min"] for s, r in zip(speed, rows)], [r["speedup_max"] - s for s, r in zip(speed, rows)]]
    bars = axes[0].bar(names, speed, yerr=err, capsize=4, color="tab:blue")
    for bar, r in zip(bars, rows):
        label = f"{r['sentences_per_s']:.1f}/s\ncos {r['mean_cos']:.4f}\nmin {r['min_cos']:.3f}"
        axes[0].annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("speed-up vs torch fp32 LLM2Vec.encode")
    axes[0].set_title(f"{result['threads']} CPU threads, batch {result['batch_size']} (median, min-max of rounds)", fontsize=9)
    sized = [r for r in rows if r.get("size_mb")]
    axes[1].bar([r["engine"] for r in sized], [r["size_mb"] for r in sized], color="tab:orange")
    axes[1].set_ylabel("MB on disk")
    axes[1].set_title("model size", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.margins(y=0.25)
    fig.suptitle(f"{result['model'][:90]} on {result['cpu']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
