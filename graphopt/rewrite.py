"""Graph-editing helpers that keep the graph's interface intact.

The one rule every pass must respect: graph input and output *names* never
change.  When a value that is a graph output is replaced, the replacement is
renamed to the output's name, or the rewrite is refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from graphopt.ir import Model

# The operator sets whose ops graphopt knows by name (ai.onnx and ai.onnx.ml;
# their op names do not collide).  Custom-domain ops may have side effects or
# state we cannot see.
STANDARD_DOMAINS = frozenset({None, "", "ai.onnx", "ai.onnx.ml"})


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every consumer of ``old`` read ``new``; False (and no change) if impossible.

    ``old`` is normally the output of a node about to become dead.  If ``old``
    is a graph output, ``new`` takes its name and place, which is only possible
    when ``new`` is not itself a graph input or output.  Subgraphs share tensor
    objects with their outer scope in gs, so a rename reaches them too.
    """
    if old is new:
        return False
    if is_graph_output(graph, old):
        if is_graph_input(graph, new) or is_graph_output(graph, new):
            return False
        name = old.name
        old.name = name + "__replaced"
        new.name = name
        if new.dtype is None and old.dtype is not None:
            new.dtype = old.dtype
        if getattr(new, "shape", None) is None and old.shape is not None and isinstance(new, gs.Variable):
            new.shape = old.shape
        graph.outputs = [new if t is old else t for t in graph.outputs]
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    return True


def sort_nodes(graph: gs.Graph) -> bool:
    """Sort ``graph`` topologically (onnx-graphsurgeon's order); True when the
    order changed, which is a change the calling pass must report."""
    order = [id(n) for n in graph.nodes]
    graph.toposort()
    return order != [id(n) for n in graph.nodes]


def remove_nodes(graph: gs.Graph, nodes) -> None:
    """Detach ``nodes`` and drop them from the graph in one sweep.

    By identity: gs nodes compare field by field, so ``list.remove`` per node
    would make removing many nodes quadratic.
    """
    ids = {id(n) for n in nodes}
    if not ids:
        return
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes = [n for n in graph.nodes if id(n) not in ids]


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape when every dimension is a known integer, else None.

    Rewrites that compare shapes must not guess: a symbolic or missing dim
    could be anything at run time.
    """
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    dims = tuple(shape)
    if not all(isinstance(d, (int,)) and not isinstance(d, bool) and d >= 0 for d in dims):
        return None
    return tuple(int(d) for d in dims)


def as_constant(tensor: gs.Tensor, overridable: "set[str] | frozenset[str]" = frozenset()) -> gs.Constant | None:
    """The constant behind ``tensor`` (an initializer or a Constant node's
    ``value``), or None.  Initializers the caller may feed at run time
    (``overridable``, the model's initializer-inputs) are not constants."""
    if isinstance(tensor, gs.Constant):
        return None if tensor.name in overridable else tensor
    producers = getattr(tensor, "inputs", [])
    if len(producers) == 1:
        node = producers[0]
        if node.op == "Constant" and node.domain in (None, "", "ai.onnx") and len(node.attrs) == 1:
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant):
                return value
    return None


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading ``tensor`` when nothing else (graph outputs
    included) observes it: only then may a fusion swallow the tensor."""
    if is_graph_output(graph, tensor) or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def fresh_name(taken: set[str], base: str) -> str:
    """A tensor name not in ``taken`` (which is updated), derived from ``base``."""
    name = base
    i = 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


# Operands the ONNX spec declares scalar (0-d).  onnxruntime's kernels also take
# a one-element 1-D tensor there, so an exporter's shape-[1] value goes through
# while it is computed; once folding makes it a constant, shape inference reads
# it and refuses the model (Range: "Input to 'Range' op should be scalars").
SCALAR_OPERANDS: dict[str, tuple[int, ...]] = {
    "Range": (0, 1, 2),
    "Clip": (1, 2),
    "CumSum": (1,),
    "CumProd": (1,),
    "Trilu": (1,),
    "Pad": (2,),
    "DFT": (1, 2),
    "STFT": (1, 3),
    "BlackmanWindow": (0,),
    "HammingWindow": (0,),
    "HannWindow": (0,),
    "SequenceAt": (1,),
    "SequenceErase": (1,),
    "SequenceInsert": (2,),
}


def legalize_scalar_operands(graph: gs.Graph) -> int:
    """Feed every scalar operand that reads a one-element constant of rank > 0 a
    0-d copy of it (other readers keep the original); returns how many operands
    changed.  The values are the same, so this never changes the outputs."""
    taken = set(graph.tensors().keys())
    copies: dict[int, gs.Constant] = {}
    changed = 0
    for node in graph.nodes:
        if (node.domain or "") not in ("", "ai.onnx"):
            continue
        for index in SCALAR_OPERANDS.get(node.op, ()):
            if index >= len(node.inputs):
                continue
            operand = node.inputs[index]
            if not isinstance(operand, gs.Constant) or len(operand.shape) == 0 or operand.values.size != 1:
                continue
            scalar = copies.get(id(operand))
            if scalar is None:
                scalar = gs.Constant(fresh_name(taken, operand.name + "__scalar"), operand.values.reshape(()))
                copies[id(operand)] = scalar
            node.inputs[index] = scalar
            changed += 1
    return changed


def lacks_annotations(model: "Model", ops: set[str]) -> bool:
    """Whether some node of ``ops`` reads a value of unknown dtype or shape:
    shape inference costs an export of the whole model, so it is skipped
    when an earlier ``infer-shapes`` already did the work."""
    from graphopt.ir import iter_graphs

    for graph in iter_graphs(model.graph):
        for node in graph.nodes:
            if node.op in ops:
                for t in node.inputs:
                    if isinstance(t, gs.Variable) and t.name and (t.dtype is None or t.shape is None):
                        return True
    return False
