"""The structural verifier the pass manager runs after every pass that changed
the model (MLIR's verifier between passes): cheap, always on, numbers-free.

A pass may rewrite anything inside the graph, but it may not rename or drop
the graph's inputs and outputs (callers feed and read them by name), leave a
node reading a value that nothing produces, or leave nodes out of
topological order (the ONNX checker and every runtime reject that).  Numeric
checks are ``--verify-each``'s job; this one only proves the graph is a graph.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphopt.ir import Model, node_subgraphs


def io_names(model: Model) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The graph's input and output names, in order: what a pass must keep."""
    graph = model.graph
    return tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs)


def structure_errors(model: Model, expected_io: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
                     limit: int = 3) -> list[str]:
    """Up to ``limit`` one-line descriptions of what is structurally wrong."""
    errors: list[str] = []
    if expected_io is not None:
        inputs, outputs = io_names(model)
        if inputs != expected_io[0]:
            errors.append(f"graph inputs changed from {list(expected_io[0])} to {list(inputs)}")
        if outputs != expected_io[1]:
            errors.append(f"graph outputs changed from {list(expected_io[1])} to {list(outputs)}")
    _check_graph(model.graph, frozenset(), errors, "")
    return errors[:limit]


def _check_graph(graph: gs.Graph, outer: frozenset[str], errors: list[str], where: str) -> None:
    available = set(outer) | {t.name for t in graph.inputs}
    produced: set[str] | None = None  # every node output; only a broken graph needs it
    for node in graph.nodes:
        for t in node.inputs:
            if t.name == "" or isinstance(t, gs.Constant) or t.name in available:
                continue
            if produced is None:
                produced = {out.name for n in graph.nodes for out in n.outputs}
            what = "before it is produced (nodes out of topological order)" if t.name in produced \
                else "which nothing produces (a dangling edge)"
            errors.append(f"{where}node '{node.name}' ({node.op}) reads '{t.name}' {what}")
        for sub in node_subgraphs(node):
            _check_graph(sub, frozenset(available), errors, f"{where}{node.name}/")
        available.update(t.name for t in node.outputs)
    for t in graph.outputs:
        if not isinstance(t, gs.Constant) and t.name not in available:
            errors.append(f"{where}graph output '{t.name}' is produced by no node and is no graph input")


def snapshot(model: Model) -> onnx.ModelProto:
    """The whole model, weights included, as a pass must leave it when it says
    ``changed=False``.  Inferred shapes of intermediate values (value_info) are
    analysis results, not the model, and are left out; tensors are compared by
    value (a constant a pass only read may come back as raw bytes instead of
    typed fields)."""
    proto = model.to_proto()
    _canonicalize(proto.graph)
    return proto


def first_difference(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    """Where two snapshots first differ, in one phrase."""
    if list(before.opset_import) != list(after.opset_import):
        return "the opset imports"
    b, a = before.graph, after.graph
    for field in ("input", "output"):
        if list(getattr(b, field)) != list(getattr(a, field)):
            return f"the graph {field}s"
    for i, (nb, na) in enumerate(zip(b.node, a.node)):
        if nb != na:
            return f"node {i} ('{nb.name}' {nb.op_type} became '{na.name}' {na.op_type})"
    if len(b.node) != len(a.node):
        return f"the node count ({len(b.node)} -> {len(a.node)})"
    if [t.name for t in b.initializer] != [t.name for t in a.initializer]:
        return "the initializer names"
    changed = next((tb.name for tb, ta in zip(b.initializer, a.initializer) if tb != ta), None)
    return f"initializer '{changed}'" if changed else "model fields outside the graph"


def _canonicalize(graph: onnx.GraphProto) -> None:
    graph.ClearField("value_info")
    for i, tensor in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_canonical_tensor(tensor))
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                attr.t.CopyFrom(_canonical_tensor(attr.t))
            for i, tensor in enumerate(attr.tensors):
                attr.tensors[i].CopyFrom(_canonical_tensor(tensor))
            if attr.HasField("g"):
                _canonicalize(attr.g)
            for sub in attr.graphs:
                _canonicalize(sub)


def _canonical_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type in (
            onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return tensor
    try:
        return numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
    except (ValueError, TypeError, KeyError):  # a dtype numpy cannot hold: compare as stored
        return tensor
