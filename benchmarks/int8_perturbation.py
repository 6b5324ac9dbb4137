"""How stable an int8 export's worst cosine is: the graph under ONNX Runtime next to the torch
simulation of the same integers (``Int8Simulator`` with the weights read from the graph, on the
export's SmoothQuant copy), once as is and under tiny input perturbations.

Each perturbation draw multiplies every token embedding by ``1 + eps * N(0, 1)`` (``eps`` 1e-6 by
default: far below any int8 step, about what separates two CPUs' fp32 kernels). An input whose
cosine to fp32 jumps between draws sits on a knife edge: whether it passes a bar says more about
that draw than about the graph, and two CPUs can land on different sides of it. Held-out text as
``bench_onnx.py`` scores it (STS-B dev sentences after the pairs export validation reads, and
``[instruction, text]`` pairs). Accuracy only, no timing: any machine will do.

    python benchmarks/int8_perturbation.py --export runs/onnx_bench/int8            # default encoder's int8 export
    python benchmarks/int8_perturbation.py --export DIR --model CKPT --draws 8 --eps 1e-5

Writes ``benchmarks/results/int8-perturbation.json`` (or ``--output``) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path (tests)
from bench_onnx import held_out_inputs  # noqa: E402
from common import model_description  # noqa: E402
from int8_levers import cosine_table  # noqa: E402
from portable_paths import portable_argv, portable_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KNIFE_EDGE_SPREAD = 0.01  # an input whose cosine moves more than this between draws


def graph_int8_weights(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MatMul name -> the int8 ``[in, out]`` weight and float32 scale ``[out]`` the graph stores
    (``quantize.rowwise_int8_matmuls``' ``{name}/W_int8`` and ``{name}/W_scale``)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    return {
        name[: -len("/W_int8")]: (numpy_helper.to_array(t), numpy_helper.to_array(inits[name[: -len("/W_int8")] + "/W_scale"]))
        for name, t in inits.items()
        if name.endswith("/W_int8")
    }


def simulated_encoder(encoder, report: dict, graph):
    """The encoder the graph was exported from: ``encoder`` or its SmoothQuant copy, rebuilt from
    the calibration inputs the report names and checked against the graph's first norm weight."""
    from llm2vec_fast.export.calibrate import calibration_inputs
    from llm2vec_fast.export.smoothing import smoothed_copy
    from onnx import numpy_helper

    smoothing = report["quantization"].get("smoothing") or {}
    if not smoothing.get("alpha"):
        return encoder
    source = smoothed_copy(encoder, calibration_inputs(smoothing["inputs"]), smoothing["alpha"])
    norm = "decoder.layers.0.input_layernorm.weight"
    stored = next((numpy_helper.to_array(t) for t in graph.graph.initializer if t.name == norm), None)
    ours = source.model.layers[0].input_layernorm.weight.detach().numpy()
    if stored is not None and not np.allclose(stored, ours, rtol=1e-5, atol=0):
        raise SystemExit(
            "int8_perturbation: the SmoothQuant scales recomputed here differ from the export's (other calibration data? "
            "set LLM2VEC_FAST_STSB_DIR as when it was exported)"
        )
    return source


@contextlib.contextmanager
def perturbed_embeddings(encoder, eps: float, seed: int) -> Iterator[None]:
    """Within the block, ``encoder``'s token embeddings are multiplied by ``1 + eps * N(0, 1)`` (seeded)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hook = encoder.model.get_input_embeddings().register_forward_hook(
        lambda _m, _a, out: out * (1 + eps * torch.randn(out.shape, generator=generator, dtype=out.dtype))
    )
    try:
        yield
    finally:
        hook.remove()


def summary(cos: np.ndarray, inputs: list) -> dict:
    worst = int(np.argmin(cos))
    return {"mean_cos": round(float(cos.mean()), 6), "min_cos": round(float(cos[worst]), 6), "worst_input": inputs[worst]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="folder of an int8 export (export_report.json, model.onnx)")
    parser.add_argument(
        "--model", default=None, help="checkpoint it was exported from (default: the default encoder, trained; default-base: the base)"
    )
    parser.add_argument("--peft", action="append", default=None, metavar="ADAPTER", help="LoRA adapter (repeat to chain; merged)")
    parser.add_argument("--sentences", type=int, default=256, help="held-out STS-B dev sentences (half as many pairs), as bench_onnx")
    parser.add_argument("--draws", type=int, default=4, help="perturbed draws besides the unperturbed one")
    parser.add_argument("--eps", type=float, default=1e-6, help="relative size of the perturbation")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.draws < 1 or not args.eps > 0:
        raise SystemExit("int8_perturbation: --draws must be >= 1 and --eps > 0")
    report_path = args.export / "export_report.json"
    if not report_path.is_file():
        raise SystemExit(f"int8_perturbation: {portable_path(args.export)} is not an export folder (no export_report.json)")
    report = json.loads(report_path.read_text())
    if report.get("precision") != "int8":
        raise SystemExit(f"int8_perturbation: needs an int8 export (ONNX Runtime), this one is {report.get('precision')!r}")

    import onnx
    import torch
    from llm2vec_fast.export import OnnxEncoder
    from llm2vec_fast.export.calibrate import Int8Simulator, cosine_rows
    from llm2vec_fast.export.cpu_int8 import cpu_flags, cpu_name

    from llm2vec_fast import LLM2Vec

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft, merge_peft=True, dtype="float32", device="cpu")
    graph = onnx.load(str(args.export / "model.onnx"))
    weights = graph_int8_weights(graph)
    source = simulated_encoder(encoder, report, graph)
    del graph
    simulator = Int8Simulator(source, weights=weights)
    int8_names = set(weights)
    missing = int8_names - set(simulator.modules)
    if missing:
        raise SystemExit(f"int8_perturbation: the graph's int8 MatMuls {sorted(missing)[:3]} are not decoder Linears of this model")
    texts, pairs = held_out_inputs(args.sentences)
    kinds = {"plain": texts, "instructions": pairs}
    reference = {k: np.asarray(encoder.encode(x, show_progress_bar=False, convert_to_numpy=True)) for k, x in kinds.items()}
    onnx_encoder = OnnxEncoder.from_pretrained(args.export, num_threads=args.threads)
    cos: dict[str, dict[str, np.ndarray]] = {
        "graph (ONNX Runtime)": {
            k: cosine_rows(np.asarray(onnx_encoder.encode(x, show_progress_bar=False)), reference[k]) for k, x in kinds.items()
        },
        "simulation": {k: cosine_rows(simulator.embed(int8_names, x), reference[k]) for k, x in kinds.items()},
    }
    for draw in range(1, args.draws + 1):
        with perturbed_embeddings(source, args.eps, draw):
            cos[f"simulation, perturbed draw {draw}"] = {
                k: cosine_rows(simulator.embed(int8_names, x), reference[k]) for k, x in kinds.items()
            }
    rows = [{"engine": name, **{k: summary(c[k], kinds[k]) for k in kinds}} for name, c in cos.items()]
    draws = {k: np.stack([c[k] for name, c in cos.items() if name.startswith("simulation")]) for k in kinds}
    knife_edge = {}
    for k, stack in draws.items():
        spread = stack.max(0) - stack.min(0)
        order = [int(i) for i in np.argsort(-spread) if spread[i] > KNIFE_EDGE_SPREAD]
        knife_edge[k] = [
            {"input": kinds[k][i], "min_cos": round(float(stack[:, i].min()), 6), "max_cos": round(float(stack[:, i].max()), 6)}
            for i in order[:5]
        ] + ([{"more": len(order) - 5}] if len(order) > 5 else [])
    q = report["quantization"]
    result = {
        "model": model_description(args.model, args.peft),
        "export": {
            "int8_layers": len(q.get("int8_layers", [])),
            "layers": len(q.get("int8_layers", [])) + len(q.get("fp32_layers", [])),
            "weight_bits": q.get("weight_bits"),
            "weight_rounding": q.get("weight_rounding"),
            "smoothing": q.get("smoothing"),
            "exported_on": {"cpu": q.get("cpu"), "cpu_flags": q.get("cpu_flags")},
        },
        "held_out": {"plain": len(texts), "instructions": len(pairs)},
        "eps": args.eps,
        "draws": args.draws,
        "knife_edge_spread": KNIFE_EDGE_SPREAD,
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "argv": portable_argv(sys.argv if argv is None else ["int8_perturbation.py", *argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "knife_edge_inputs": knife_edge,
    }
    out = args.output or RESULTS / "int8-perturbation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_table(result))
    return 0


def render_table(result: dict) -> str:
    e = result["export"]
    lines = [
        f"{result['model']}, int8 export with {e['int8_layers']}/{e['layers']} layers int8 ({e['weight_bits']}-bit, "
        f"{e['weight_rounding']}); cosine to torch fp32 on {result['held_out']['plain']} held-out sentences / "
        f"{result['held_out']['instructions']} [instruction, text] pairs; perturbation eps {result['eps']:g}; "
        f"{result['cpu']} ({', '.join(result['cpu_flags']) or 'no int8 flags'}).",
        "",
        *cosine_table(result["rows"], "engine", "engine"),
    ]
    edges = [(kind, x) for kind, inputs in result["knife_edge_inputs"].items() for x in inputs]
    spread = result["knife_edge_spread"]
    if edges:
        lines += ["", f"Inputs whose cosine moves more than {spread} across the simulated draws:"]
    else:
        lines += ["", f"No input's cosine moves more than {spread} across the simulated draws."]
    for kind, x in edges:
        if "more" in x:
            lines.append(f"- and {x['more']} more ({kind})")
        else:
            lines.append(f"- ({kind}) {x['input']!r}: {x['min_cos']:.4f} to {x['max_cos']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
