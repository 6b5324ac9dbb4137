"""Quantization of an exported fp32 graph for int8 and int4 (ONNX Runtime ops only).

* **int8** -- the MatMuls chosen by calibration become an int8 product with **one activation
  scale per token** (:func:`rowwise_int8_matmuls`): ``MatMulIntegerToFloat`` (the MLAS u8 x s8
  GEMM, per-column rescale in its epilogue) between the activations, quantized at run time to
  symmetric int8 with a per-row scale and stored as uint8 + 128 (one ``QuantizeLinear``), and
  int8 weights with one scale per output column, symmetric, 7-bit range on CPUs without VNNI/AMX
  (AVX2 multiplies u8 x s8 with ``vpmaddubsw``, whose int16 pair sums saturate with full-range
  weights -- measured: cosine 0.16 with 8-bit per-column weights), 8-bit with them (``cpu_int8``);
  the integers are GPTQ's when calibration gives them (``gptq``); one ``Mul`` applies the row scale.
  ONNX Runtime's fused dynamic int8 ops (``DynamicQuantizeMatMul``, :func:`dynamic_int8_matmuls`,
  and ``MatMulIntegerToFloat``'s own activation scale) take a single activation scale per tensor,
  so one attention-sink token (residual values ~13,000 in the untrained bidirectional SmolLM2)
  sets the step for every other token of the batch; the per-row scale is written into the graph
  instead (4 full passes over the activations per quantized input).
* **int8-openvino** -- the decoder MatMuls keep fp32 activations and int8 weights behind a
  ``DequantizeLinear`` (:func:`weight_only_int8_matmuls`); OpenVINO quantizes the activations at
  run time per token *and group of 64 input channels* by default (finer than one scale per token,
  which is what lets nearly every layer run in int8) and multiplies on its int8 kernels.
* **int4** (and the 8-bit MatMulNBits helpers below) -- every MatMul with a constant weight becomes an ONNX Runtime ``MatMulNBits``
  (block-wise weights, block 32 along the input dimension, min-max asymmetric). The offset of
  each block is kept *unrounded*:

  - 4-bit: as MatMulNBits' floating-point zero points;
  - 8-bit: the CPU kernel takes only integer zero points, so the block minimum ``lo`` is applied
    as ``y += blocksum(x) @ lo`` (one extra MatMul 1/32 the size), with zero points 0.

  Unrounded offsets make the quantization exact for weights that already sit on a 2**b-level grid
  per 32-block (e.g. checkpoints converted from GGUF Q4_0/Q4_1, like the embedded default model),
  and remove the zero-point rounding error on any other checkpoint.
* The embedding table (the big ``Gather``) is stored in fp16 for int8 and int4.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .int8_rounding import INT8_WEIGHT_LEVELS, ROW_ACTIVATION_LEVELS, round_to_levels

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32
MS_DOMAIN = "com.microsoft"
MIN_GATHER_ELEMENTS = 1 << 16  # a Gather table this big is the embedding matrix


# ---------------------------------------------------------------------------------- int8 / int4
def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def quantize_blocks(w: np.ndarray, bits: int, block: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max asymmetric block quantization of ``w`` ``[K, N]`` along K.

    Returns ``q`` ``[N, K/block, block]`` (uint8 levels), ``scale`` and ``lo`` ``[N, K/block]``
    with ``w[k, n] ~= scale[n, b] * q[n, b, j] + lo[n, b]``.
    """
    k, n = w.shape
    wb = w.T.reshape(n, k // block, block).astype(np.float64)
    lo = wb.min(axis=2)
    hi = wb.max(axis=2)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint((wb - lo[..., None]) / scale[..., None]), 0, levels).astype(np.uint8)
    return q, scale.astype(np.float32), lo.astype(np.float32)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


class _GraphEditor:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = _initializers(model)
        self.new_inits: list[onnx.TensorProto] = []
        self.removed: set[str] = set()
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self._blocksums: dict[str, str] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is None or t.data_type != onnx.TensorProto.FLOAT:
            return None
        return numpy_helper.to_array(t)

    def drop_if_unused(self, name: str) -> None:
        self.uses[name] -= 1
        if self.uses[name] == 0:
            self.removed.add(name)

    def blocksum(self, x: str, k: int, block: int, prefix: str, nodes: list) -> str:
        """``x [..., K] -> [..., K/block]`` block sums, shared by MatMuls with the same input."""
        key = f"{x}|{block}"
        if key in self._blocksums:
            return self._blocksums[key]
        tag = f"{prefix}/blocksum"
        shape = f"{tag}/shape"
        nodes += [
            helper.make_node("Shape", [x], [f"{tag}/x_shape"], name=f"{tag}/Shape", end=-1),
            helper.make_node(
                "Concat",
                [f"{tag}/x_shape", self.const(f"{tag}/blocks", np.array([k // block, block], np.int64))],
                [shape],
                name=f"{tag}/Concat",
                axis=0,
            ),
            helper.make_node("Reshape", [x, shape], [f"{tag}/blocked"], name=f"{tag}/Reshape"),
            helper.make_node(
                "ReduceSum",
                [f"{tag}/blocked", self.const(f"{tag}/axis", np.array([-1], np.int64))],
                [f"{tag}/out"],
                name=f"{tag}/ReduceSum",
                keepdims=0,
            ),
        ]
        self._blocksums[key] = f"{tag}/out"
        return self._blocksums[key]

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        kept = [t for t in graph.initializer if t.name not in self.removed]
        graph.ClearField("initializer")
        graph.initializer.extend(kept + self.new_inits)
        return self.model


def quantize_matmuls(model: onnx.ModelProto, bits: int, block: int = BLOCK_SIZE, exclude: set[str] | None = None) -> onnx.ModelProto:
    """Replace MatMuls with constant 2-D weights by ``MatMulNBits`` (see the module docstring).
    Nodes in ``exclude`` and weights whose K is not a multiple of ``block`` stay fp32.
    8-bit nodes get ``accuracy_level=0`` (fp32 compute from int8 weights)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    exclude = exclude or set()
    ed = _GraphEditor(model)
    nodes: list = []
    for node in model.graph.node:
        w = ed.weight(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or w.ndim != 2 or w.shape[0] % block or node.name in exclude:
            nodes.append(node)
            continue
        k, n = w.shape
        q, scale, lo = quantize_blocks(w, bits, block)
        base = node.name or node.output[0]
        inputs = [node.input[0], ed.const(f"{base}/Bq", _pack(q, bits)), ed.const(f"{base}/scales", scale.reshape(-1))]
        attrs = dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=0)
        if bits == 4:  # floating-point zero points: w = scale * (q - zp), zp = -lo / scale
            inputs.append(ed.const(f"{base}/zero_points", (-lo / scale).reshape(-1).astype(np.float32)))
            nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{base}_Q{bits}", domain=MS_DOMAIN, **attrs))
        else:  # integer zero point 0, and the block minimum as a separate blocksum @ lo term
            inputs.append(ed.const(f"{base}/zero_points", np.zeros(n * (k // block), np.uint8)))
            main = f"{base}/scaled"
            nodes.append(helper.make_node("MatMulNBits", inputs, [main], name=f"{base}_Q{bits}", domain=MS_DOMAIN, **attrs))
            sums = ed.blocksum(node.input[0], k, block, base, nodes)
            offset = ed.const(f"{base}/block_min", np.ascontiguousarray(lo.T))
            nodes += [
                helper.make_node("MatMul", [sums, offset], [f"{base}/offset"], name=f"{base}/OffsetMatMul"),
                helper.make_node("Add", [main, f"{base}/offset"], list(node.output), name=f"{base}/OffsetAdd"),
            ]
        ed.drop_if_unused(node.input[1])
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    _ensure_ms_opset(model)
    return ed.finish()


def embeddings_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store large Gather tables (the token embedding) in fp16, cast back to fp32 after the lookup."""
    ed = _GraphEditor(model)
    nodes: list = []
    for node in model.graph.node:
        table = ed.weight(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.size < MIN_GATHER_ELEMENTS or ed.uses[node.input[0]] != 1:
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        half = ed.const(f"{base}/table_fp16", table.astype(np.float16))
        gathered = f"{base}/fp16_out"
        nodes += [
            helper.make_node("Gather", [half, node.input[1]], [gathered], name=node.name, axis=_axis(node)),
            helper.make_node("Cast", [gathered], list(node.output), name=f"{base}/CastFp32", to=onnx.TensorProto.FLOAT),
        ]
        ed.drop_if_unused(node.input[0])
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return ed.finish()


def _axis(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return 0


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# --------------------------------------------------------------------- int8 dynamic quantization
def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes with a constant 2-D fp32 weight (the ones int8 can quantize)."""
    ed = _GraphEditor(model)
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.name:
            w = ed.weight(node.input[1])
            if w is not None and w.ndim == 2:
                out.append(node.name)
    return out


def quantize_columns(w: np.ndarray, levels: int = INT8_WEIGHT_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column quantization of ``w`` ``[K, N]`` (graph layout: one column per output):
    int8 ``q`` ``[K, N]`` and float32 ``scale`` ``[N]`` with ``w ~= q * scale``
    (:func:`~.int8_rounding.round_to_levels`)."""
    q, scale = round_to_levels(torch.from_numpy(np.array(w)).T, levels)
    return np.ascontiguousarray(q.numpy().T), scale.numpy()


def _replace_int8_weight_matmuls(
    model: onnx.ModelProto,
    names: set[str],
    weight_levels: int,
    replacement,
    weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """Replace each MatMul in ``names`` with a constant 2-D weight by the nodes
    ``replacement(node, weight_inputs)`` returns, ``weight_inputs`` being its int8 weight
    (``weights[name]`` where given, else ``quantize_columns``), per-column scale and zero zero points
    as initializers. Modifies ``model``."""
    ed = _GraphEditor(model)
    nodes: list = []
    for node in model.graph.node:
        w = ed.weight(node.input[1]) if node.op_type == "MatMul" and node.name in names else None
        if w is None or w.ndim != 2:
            nodes.append(node)
            continue
        base = node.name
        q, scale = _int8_weight(base, w, weight_levels, weights)
        weight_inputs = [
            ed.const(f"{base}/W_int8", q),
            ed.const(f"{base}/W_scale", scale.astype(np.float32)),
            ed.const(f"{base}/W_zero_point", np.zeros(w.shape[1], np.int8)),
        ]
        nodes += replacement(node, weight_inputs)
        ed.drop_if_unused(node.input[1])
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return ed.finish()


def _int8_weight(name: str, w: np.ndarray, weight_levels: int, weights: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``weights[name]`` (checked against ``w``'s shape) where given, else ``w`` rounded to nearest."""
    if not weights or name not in weights:
        return quantize_columns(w, weight_levels)
    q, scale = weights[name]
    if q.shape != w.shape or q.dtype != np.int8:
        raise ValueError(f"int8 weight for {name} must be int8 {w.shape}, got {q.dtype} {q.shape}")
    return q, np.asarray(scale, np.float32)


def dynamic_int8_matmuls(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Replace the MatMul nodes in ``names`` (constant 2-D weights) by ``DynamicQuantizeMatMul``
    (see the module docstring); other nodes are left as they are. Modifies ``model``."""

    def fused(node, weight_inputs):
        inputs = [node.input[0], *weight_inputs]
        return [helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output), name=f"{node.name}_int8", domain=MS_DOMAIN)]

    model = _replace_int8_weight_matmuls(model, names, INT8_WEIGHT_LEVELS, fused)
    _ensure_ms_opset(model)
    return model


def weight_only_int8_matmuls(
    model: onnx.ModelProto,
    names: set[str],
    weight_levels: int = INT8_WEIGHT_LEVELS,
    weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """Store the weights of the MatMul nodes in ``names`` as int8 (symmetric, one scale per output
    column, ``weight_levels`` each side) behind a ``DequantizeLinear``; the activations stay fp32
    in the graph. OpenVINO's CPU plugin reads this as a MatMul with int8-compressed weights and
    quantizes its input at run time, per token and group of input channels, onto its int8 GEMMs
    (``openvino_runtime``). ONNX Runtime runs it too (its graph optimizer turns each pair into an
    8-bit ``MatMulNBits``), but not fast: 1.7x the time of the per-token int8 export on a 2-core
    AVX-512 VNNI EPYC. ``weights`` (MatMul name -> int8 ``[in, out]`` and float32 scale ``[out]``,
    e.g. GPTQ's) are stored as given; other weights are rounded to nearest. Modifies ``model``."""

    def dequantized(node, weight_inputs):
        weight = f"{node.name}/W_dequantized"
        return [
            helper.make_node("DequantizeLinear", weight_inputs, [weight], name=f"{node.name}/DequantizeWeight", axis=1),
            helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=node.name),
        ]

    return _replace_int8_weight_matmuls(model, names, weight_levels, dequantized, weights)


class _RowSteps:
    """Per-row (last axis) symmetric int8 steps in a graph: ``step = max(max|x|, tiny) / 127`` and
    ``x / step``, shared by the per-token export (:func:`rowwise_int8_matmuls`) and the simulation
    of OpenVINO's rounding (:func:`simulate_activation_rounding`) so both round alike. Its constants
    are named under ``prefix``; ReduceMax takes its axes as an input from opset 18, as an attribute
    before."""

    def __init__(self, ed: _GraphEditor, model: onnx.ModelProto, prefix: str):
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.axes_in = [ed.const(f"{prefix}/axis_last", np.array([-1], np.int64))] if opset >= 18 else []
        self.axes_attr = {} if opset >= 18 else {"axes": [-1]}
        self.levels = ed.const(f"{prefix}/levels", np.array(ROW_ACTIVATION_LEVELS, np.float32))
        self.tiny = ed.const(f"{prefix}/tiny", np.array(1e-30, np.float32))

    def nodes(self, x: str, t: str) -> list:
        """Nodes that compute ``{t}/step`` (keepdims) and ``{t}/scaled`` (``x / step``, in
        ``[-127, 127]``) from ``x``."""
        return [
            helper.make_node("Abs", [x], [f"{t}/abs"], name=f"{t}/Abs"),
            helper.make_node("ReduceMax", [f"{t}/abs", *self.axes_in], [f"{t}/max"], name=f"{t}/ReduceMax", keepdims=1, **self.axes_attr),
            helper.make_node("Max", [f"{t}/max", self.tiny], [f"{t}/max_safe"], name=f"{t}/MaxTiny"),
            helper.make_node("Div", [self.levels, f"{t}/max_safe"], [f"{t}/inverse_step"], name=f"{t}/InverseStep"),
            helper.make_node("Div", [f"{t}/max_safe", self.levels], [f"{t}/step"], name=f"{t}/Step"),
            helper.make_node("Mul", [x, f"{t}/inverse_step"], [f"{t}/scaled"], name=f"{t}/Scale"),
        ]


def simulate_activation_rounding(model: onnx.ModelProto, group: int) -> onnx.ModelProto:
    """A :func:`weight_only_int8_matmuls` graph in which every MatMul with int8 weights
    gets its input quantized and dequantized in the graph as OpenVINO's CPU plugin quantizes it on
    a CPU with VNNI (symmetric int8, one scale per token and group of ``group`` input channels, one
    per token where the channels do not split into whole groups: ``int8_rounding.fake_int8_groups``).
    On an x86 CPU without VNNI OpenVINO keeps those inputs in fp32 (``cpu_int8``), so this graph is
    what validation runs there to see the embeddings a VNNI CPU computes; it is never saved as the
    export. Modifies ``model``."""
    ed = _GraphEditor(model)
    int8_weights = {t.name: tuple(t.dims) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    in_channels = {
        n.output[0]: int8_weights[n.input[0]][0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights
    }
    steps = _RowSteps(ed, model, "groupq")
    rounded: dict[str, str] = {}  # x -> its rounded copy, shared by q/k/v and gate/up
    nodes: list = []
    for node in model.graph.node:
        k = in_channels.get(node.input[1]) if node.op_type == "MatMul" else None
        if k is None:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in rounded:
            t = f"{node.name}/groupq"
            width = group if k % group == 0 else k
            nodes += [
                helper.make_node("Shape", [x], [f"{t}/x_shape"], name=f"{t}/Shape"),
                helper.make_node(
                    "Reshape", [x, ed.const(f"{t}/groups", np.array([-1, width], np.int64))], [f"{t}/grouped"], name=f"{t}/Group"
                ),
                *steps.nodes(f"{t}/grouped", t),
                helper.make_node("Round", [f"{t}/scaled"], [f"{t}/codes"], name=f"{t}/Round"),
                helper.make_node("Mul", [f"{t}/codes", f"{t}/step"], [f"{t}/dequantized"], name=f"{t}/Dequantize"),
                helper.make_node("Reshape", [f"{t}/dequantized", f"{t}/x_shape"], [f"{t}/rounded"], name=f"{t}/Ungroup"),
            ]
            rounded[x] = f"{t}/rounded"
        node.input[0] = rounded[x]
        nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return ed.finish()


# ------------------------------------------------------------ int8 with per-row activation scales


def rowwise_int8_matmuls(
    model: onnx.ModelProto,
    names: set[str],
    weight_levels: int = INT8_WEIGHT_LEVELS,
    weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """Replace the MatMul nodes in ``names`` by an int8 product with one activation scale per row
    (token): ``m = max|x|`` over the last axis, ``q = round(x * 127 / m) + 128`` as uint8 (zero
    point 128 keeps the u8 x s8 MLAS kernel), symmetric per-column int8 weights,
    ``y = ((q - 128) @ Wq) * w_scale * (m / 127)``. ONNX Runtime's fused int8 ops
    (``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``'s activation scale) take one activation
    scale per tensor, which lets one token with huge activations set the step for all others; here
    each token gets its own. Few full passes over the activations: ``Abs`` + ``ReduceMax``, one
    ``Mul`` by the per-row inverse step and one ``QuantizeLinear`` (round half to even, +128,
    saturate, cast) in; ``MatMulIntegerToFloat`` (int8 GEMM with the per-column rescale in its
    epilogue) and one per-row ``Mul`` out. ``weights`` (MatMul name -> int8 ``[in, out]`` and
    float32 scale ``[out]``, e.g. GPTQ's) are stored as given; other weights are rounded to
    nearest with ``weight_levels``. Modifies ``model``."""
    ed = _GraphEditor(model)
    nodes: list = []
    steps = _RowSteps(ed, model, "rowq")
    one = ed.const("rowq/one", np.array(1.0, np.float32))
    a_zero = ed.const("rowq/a_zero_point", np.array(128, np.uint8))
    quantized: dict[str, tuple[str, str]] = {}  # x -> (uint8 codes, row step), shared by q/k/v and gate/up
    for node in model.graph.node:
        w = ed.weight(node.input[1]) if node.op_type == "MatMul" and node.name in names else None
        if w is None or w.ndim != 2:
            nodes.append(node)
            continue
        x, base = node.input[0], node.name
        if x not in quantized:
            t = f"{base}/rowq"
            nodes += [
                *steps.nodes(x, t),
                # |scaled| <= 127: round half to even, + 128, saturate to uint8 in one op
                helper.make_node("QuantizeLinear", [f"{t}/scaled", one, a_zero], [f"{t}/codes"], name=f"{t}/Codes"),
            ]
            quantized[x] = (f"{t}/codes", f"{t}/step")
        codes, row_step = quantized[x]
        q, col_scale = _int8_weight(base, w, weight_levels, weights)
        nodes += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [codes, ed.const(f"{base}/W_int8", q), one, ed.const(f"{base}/W_scale", col_scale), a_zero],
                [f"{base}/col_scaled"],
                name=f"{base}_int8",
                domain=MS_DOMAIN,
            ),
            helper.make_node("Mul", [f"{base}/col_scaled", row_step], list(node.output), name=f"{base}/RowScale"),
        ]
        ed.drop_if_unused(node.input[1])
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    _ensure_ms_opset(model)
    return ed.finish()
