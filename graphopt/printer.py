"""A compact textual form of a graph for --print-ir-after and for test failures.

Constants print as ``@name:dtype[shape]`` (small ones with their values), so a
printed graph stays short for models with millions of weights.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

_SMALL = 8


def _tensor(t: gs.Tensor) -> str:
    if t is None or (isinstance(t, gs.Variable) and not t.name):
        return "_"
    if isinstance(t, gs.Constant):
        shape = "x".join(map(str, t.shape)) if t.shape else ""
        text = f"@{t.name}:{np.dtype(t.dtype).name if t.dtype is not None else '?'}[{shape}]"
        size = int(np.prod(t.shape)) if t.shape else 1
        if size <= _SMALL and not hasattr(t._values, "base_dir"):
            vals = np.asarray(t.values).reshape(-1).tolist()
            text += "=" + (str(vals) if t.shape else str(vals[0]))
        return text
    return f"%{t.name}"


def _type(t: gs.Tensor) -> str:
    dtype = getattr(t.dtype, "__name__", None) or (np.dtype(t.dtype).name if t.dtype is not None else "?")
    shape = "?" if t.shape is None else "x".join(str(d) for d in t.shape)
    return f"{dtype}[{shape}]"


def _attr(value) -> str:
    if isinstance(value, gs.Graph):
        return "<graph " + value.name + ">"
    if isinstance(value, gs.Constant):
        return _tensor(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_attr(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def print_graph(graph: gs.Graph, indent: str = "") -> str:
    lines = [
        indent + f"graph {graph.name}("
        + ", ".join(f"%{t.name}: {_type(t)}" for t in graph.inputs)
        + ") {"
    ]
    for node in graph.nodes:
        outs = ", ".join(_tensor(t) for t in node.outputs)
        ins = ", ".join(_tensor(t) for t in node.inputs)
        op = node.op if not node.domain else f"{node.domain}::{node.op}"
        attrs = ", ".join(f"{k}={_attr(v)}" for k, v in sorted(node.attrs.items()))
        lines.append(indent + f"  {outs} = {op}({ins})" + (f" {{{attrs}}}" if attrs else ""))
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                lines.append(print_graph(value, indent + "    "))
    lines.append(indent + "  return " + ", ".join(_tensor(t) for t in graph.outputs))
    lines.append(indent + "}")
    return "\n".join(lines)
