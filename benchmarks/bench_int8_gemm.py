"""CPU roofline of the int8 export: one decoder GEMM in ONNX Runtime, fp32 ``MatMul`` vs int8.

What an int8 ONNX export can gain at most on this CPU is what ONNX Runtime's int8 GEMM gains over
its fp32 GEMM on the decoder's shapes (SmolLM2-135M: hidden 576, intermediate 1536, k/v 192;
M = batch x tokens). For each shape: fp32 ``MatMul`` (MLAS SGEMM), the int8 export's op
``MatMulIntegerToFloat`` (u8 x s8, per-column rescale; the per-token quantization in front of
it is extra) and ``DynamicQuantizeMatMul`` (quantization included), median of ``--repeats`` runs,
speed-up vs fp32 in the same run, and the fp32 GFLOP/s.

    OMP_NUM_THREADS=2 python benchmarks/bench_int8_gemm.py            # -> results/int8-gemm-cpu.json
    python benchmarks/bench_int8_gemm.py --quick --output /tmp/x.json # smoke test

Refuses to write results on a busy machine (the same load check as ``bench_onnx.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import BusyMachineError, check_load, cpu_flags, cpu_name, wait_for_quiet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = (("q/o_proj", 576, 576), ("k/v_proj", 576, 192), ("gate/up_proj", 576, 1536), ("down_proj", 1536, 576))


def _session(nodes, inputs, outputs, initializers, threads: int):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "gemm", inputs, outputs, initializers)
    default_opset = helper.make_opsetid("", 17)
    # the IR version of the opset, as our exports have (onnx's default is its newest IR, which an
    # older ONNX Runtime refuses)
    model = helper.make_model(
        graph,
        opset_imports=[default_opset, helper.make_opsetid("com.microsoft", 1)],
        ir_version=helper.find_min_ir_version_for([default_opset]),
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_seconds(session, feeds: dict, repeats: int) -> float:
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(m: int, k: int, n: int, threads: int, repeats: int) -> dict:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    w_int8 = rng.integers(-63, 64, size=(k, n)).astype(np.int8)
    codes = rng.integers(1, 256, size=(m, k)).astype(np.uint8)
    f32_in = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])]
    scales = numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale")
    sessions = {
        "fp32 MatMul": (
            _session([helper.make_node("MatMul", ["x", "w"], ["y"])], f32_in, out, [numpy_helper.from_array(w, "w")], threads),
            {"x": x},
        ),
        "MatMulIntegerToFloat": (
            _session(
                [helper.make_node("MatMulIntegerToFloat", ["x", "w", "one", "w_scale", "zp"], ["y"], domain="com.microsoft")],
                [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
                out,
                [
                    numpy_helper.from_array(w_int8, "w"),
                    numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                    scales,
                    numpy_helper.from_array(np.array(128, np.uint8), "zp"),
                ],
                threads,
            ),
            {"x": codes},
        ),
        "DynamicQuantizeMatMul": (
            _session(
                [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "w_scale", "w_zp"], ["y"], domain="com.microsoft")],
                f32_in,
                out,
                [numpy_helper.from_array(w_int8, "w"), scales, numpy_helper.from_array(np.zeros(n, np.int8), "w_zp")],
                threads,
            ),
            {"x": x},
        ),
    }
    seconds = {name: [] for name in sessions}
    for _ in range(3):  # interleaved rounds
        for name, (session, feeds) in sessions.items():
            seconds[name].append(_median_seconds(session, feeds, repeats))
    fp32 = statistics.median(seconds["fp32 MatMul"])
    row = {"m": m, "k": k, "n": n, "fp32_ms": round(fp32 * 1e3, 3), "fp32_gflops": round(2 * m * k * n / fp32 / 1e9, 1)}
    for name in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        row[f"{name}_speedup"] = round(fp32 / statistics.median(seconds[name]), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="M: batch x tokens (batch 32 of ~16-token sentences)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--wait", type=float, default=120)
    parser.add_argument("--quick", action="store_true", help="5 repeats, no load check")
    parser.add_argument("--output", type=Path, default=RESULTS / "int8-gemm-cpu.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 5
    else:
        try:
            wait_for_quiet(args.threads, args.wait)
        except BusyMachineError as err:
            print(f"bench_int8_gemm: {err}", file=sys.stderr)
            return 3
    rows = []
    for name, k, n in SHAPES:
        if not args.quick:
            check_load(args.threads, running=True)
        rows.append({"matmul": name, **measure(args.tokens, k, n, args.threads, args.repeats)})
        print(json.dumps(rows[-1]))
    result = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "load_before": os.getloadavg()[0],
        "note": "speed-up of one GEMM vs ONNX Runtime's fp32 MatMul, same run; the int8 export also pays per-token quantization",
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
