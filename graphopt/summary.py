"""Model summaries: interface, op histogram, parameters and MACs.

MACs count multiply-accumulates of the ops that dominate inference cost
(convolutions, matrix products, recurrent cells); elementwise ops count zero.
Shapes come from onnx shape inference; a symbolic dimension counts as 1, and
the summary says which dims were assumed.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.stats import graph_stats


def _shape_map(model: Model, input_shapes: Mapping[str, list[int]] | None = None) -> dict[str, list]:
    proto = model.to_analysis_proto()
    for vi in proto.graph.input:
        pinned = (input_shapes or {}).get(vi.name)
        if pinned is not None and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.shape.Clear()
            for d in pinned:
                vi.type.tensor_type.shape.dim.add().dim_value = d
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        pass
    shapes: dict[str, list] = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    for t in proto.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _num(shape) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) and d >= 0 else 1
    return n


def _dims(shapes: dict[str, list], tensor: gs.Tensor | None) -> list | None:
    if tensor is None or not tensor.name:
        return None
    if isinstance(tensor, gs.Constant):
        return list(tensor.shape)
    return shapes.get(tensor.name)


def _conv(node: gs.Node, shapes) -> int:
    w, y = _dims(shapes, node.inputs[1]), _dims(shapes, node.outputs[0])
    if w is None or y is None:
        return 0
    # Conv weight is [M, C/group, k...]; each output element needs C/group * prod(k) MACs.
    return _num(y) * _num(w[1:])


def _conv_transpose(node: gs.Node, shapes) -> int:
    x, w = _dims(shapes, node.inputs[0]), _dims(shapes, node.inputs[1])
    if x is None or w is None:
        return 0
    # ConvTranspose weight is [C, M/group, k...]; each input element scatters M/group * prod(k).
    return _num(x) * _num(w[1:])


def _matmul(node: gs.Node, shapes) -> int:
    a, y = _dims(shapes, node.inputs[0]), _dims(shapes, node.outputs[0])
    if a is None or y is None or not a:
        return 0
    return _num(y) * (a[-1] if isinstance(a[-1], int) else 1)


def _gemm(node: gs.Node, shapes) -> int:
    a, y = _dims(shapes, node.inputs[0]), _dims(shapes, node.outputs[0])
    if a is None or y is None or len(a) != 2:
        return 0
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return _num(y) * (k if isinstance(k, int) else 1)


def _recurrent(node: gs.Node, shapes) -> int:
    x, w, r = (_dims(shapes, node.inputs[i]) for i in range(3))
    if x is None or w is None or r is None:
        return 0
    # W is [dirs, gates*H, I] and R is [dirs, gates*H, H]: every (step, batch row)
    # multiplies the input by W and the state by R in each direction.
    return _num(x[:2]) * (_num(w) + _num(r))


_MACS: dict[str, Callable[[gs.Node, Any], int]] = {
    "Conv": _conv,
    "ConvInteger": _conv,
    "QLinearConv": lambda n, s: _conv(gs.Node(op="Conv", inputs=[n.inputs[0], n.inputs[3]], outputs=n.outputs), s),
    "ConvTranspose": _conv_transpose,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": lambda n, s: _matmul(gs.Node(op="MatMul", inputs=[n.inputs[0]], outputs=n.outputs), s),
    "Gemm": _gemm,
    "LSTM": _recurrent,
    "GRU": _recurrent,
    "RNN": _recurrent,
}


def node_macs(model: Model, input_shapes: Mapping[str, list[int]] | None = None) -> list[dict[str, Any]]:
    shapes = _shape_map(model, input_shapes)
    out = []
    for node in model.graph.nodes:
        fn = _MACS.get(node.op) if node.domain in ("", "ai.onnx", None) else None
        macs = 0
        if fn is not None:
            try:
                macs = int(fn(node, shapes))
            except (IndexError, TypeError, ValueError):
                macs = 0
        out.append({"name": node.name, "op": node.op, "macs": macs})
    return out


def _value_info(t: gs.Tensor) -> dict[str, Any]:
    dtype = None
    if t.dtype is not None:
        try:
            dtype = np.dtype(t.dtype).name
        except TypeError:
            dtype = str(t.dtype)
    shape = None if t.shape is None else [d if isinstance(d, int) else str(d) for d in t.shape]
    return {"name": t.name, "dtype": dtype, "shape": shape}


def summarize(model: Model, input_shapes: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
    """``input_shapes`` pins dynamic input dims (as --input-shape does) for MACs."""
    graph = model.graph
    stats = graph_stats(graph)
    per_node = node_macs(model, input_shapes)
    ops = collections.Counter(
        (f"{n.domain}::{n.op}" if n.domain not in ("", "ai.onnx", None) else n.op) for n in graph.nodes
    )
    symbolic = sorted(
        {
            str(d)
            for t in graph.inputs
            if t.shape is not None and t.name not in (input_shapes or {})
            for d in t.shape
            if not isinstance(d, int) or d < 0
        }
    )
    return {
        "inputs": [_value_info(t) for t in graph.inputs],
        "outputs": [_value_info(t) for t in graph.outputs],
        "opsets": dict(sorted(model.info.opset_imports.items())),
        "nodes": len(graph.nodes),
        "nodes_total": stats.nodes,
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "params": stats.parameters,
        "param_bytes": stats.bytes,
        "initializers": stats.initializers,
        "macs": sum(n["macs"] for n in per_node),
        "symbolic_dims_as_1": symbolic,
        "per_node": per_node,
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def format_summary(s: dict[str, Any], per_node: bool = False) -> str:
    lines = ["inputs:"]
    lines += [f"  {v['name']}: {v['dtype']}{v['shape']}" for v in s["inputs"]]
    lines.append("outputs:")
    lines += [f"  {v['name']}: {v['dtype']}{v['shape']}" for v in s["outputs"]]
    lines.append("opsets: " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in s["opsets"].items()))
    lines.append(f"nodes: {s['nodes']} (with subgraphs: {s['nodes_total']})")
    lines.append(f"parameters: {s['params']:,} ({_human(s['param_bytes'])}B in {s['initializers']} initializers)")
    lines.append(f"MACs: {s['macs']:,} ({_human(s['macs'])})")
    if s["symbolic_dims_as_1"]:
        lines.append("  (symbolic dims counted as 1: " + ", ".join(s["symbolic_dims_as_1"]) + ")")
    lines.append("ops:")
    lines += [f"  {op:<24}{count}" for op, count in s["ops"].items()]
    if per_node:
        lines.append("MACs per node:")
        lines += [f"  {n['name'] or '<unnamed>':<40}{n['op']:<16}{n['macs']:,}" for n in s["per_node"] if n["macs"]]
    return "\n".join(lines)
